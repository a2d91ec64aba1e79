"""Fused scaled-dot-product attention: the functional API, input checks, backend choice, autograd.

Native contract (the same for every backend, so the tests can hold them all to one oracle):

    attention_fwd(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset,
                  softcap, seed) -> (out, lse)
    attention_bwd(grad_out, q, k, v, out, lse, attn_bias, dropout_p, scale, window_left,
                  window_right, diag_offset, softcap, seed) -> (grad_q, grad_k, grad_v)

* q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``, ``Hq % Hkv == 0`` (query head h
  reads KV head ``h // (Hq // Hkv)``); last dim contiguous, other strides arbitrary.
* attn_bias: ``None`` or q's dtype, shape ``(B, Hq, L, S)`` with arbitrary strides (0 for broadcast
  dims, the last one included); added to the scores, ``-inf`` removes a key.
* score ``s_ij = scale * q_i·k_j``; if ``softcap > 0``: ``s = softcap * tanh(s / softcap)``; then
  ``+ bias``; key j is visible to query i iff ``i + diag_offset - window_left <= j`` (when
  ``window_left >= 0``) and ``j <= i + diag_offset + window_right`` (when ``window_right >= 0``).
  torch's ``is_causal`` is ``(window_left, window_right, diag_offset) = (-1, 0, 0)``;
  flash-attn's bottom-right causal has ``diag_offset = S - L``.
* ``lse`` = log-sum-exp of the visible scores, ``(B, Hq, L)``, float32 (float64 for float64
  input); a row with nothing visible has ``lse = +inf`` and output 0, which makes its
  recomputed probabilities ``exp(s - lse)`` 0 in backward, so its gradients are 0 too.
* dropout on the normalised probabilities, kept entries scaled by ``1 / (1 - p)``; entry
  ``(b, h, i, j)`` is kept iff ``hash(seed, (b*Hq + h)*L + i, j) >= p * 2**32`` with the 32-bit
  hash of :func:`dropout_keep_mask` (every backend uses the same one, so forward and backward,
  and all backends, drop the same entries).
* out ``(B, Hq, L, Ev)`` contiguous in q's dtype; grads contiguous, shaped like q, k, v.

Packed variable-length batches (flash-attn's varlen convention), one kernel call for the batch:

    attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                         scale, window_left, window_right, bottom_right, softcap, seed) -> (out, lse)
    attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, dropout_p, scale, window_left, window_right, bottom_right,
                         softcap, seed) -> (grad_q, grad_k, grad_v)

* q ``(Tq, Hq, E)``, k ``(Tk, Hkv, E)``, v ``(Tk, Hkv, Ev)`` (last dim contiguous, other strides
  arbitrary); ``cu_seqlens_q/k`` int32, contiguous, ``(N + 1,)``, on q's device, non-decreasing from 0
  to Tq / Tk: sequence b is query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` against key rows
  ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; ``max_seqlen_q/k`` bound every sequence's length (the
  kernels size their grids with them; the Python wrapper checks them).
* Within sequence b (Lb query rows, Sb keys) the rules above hold with local indices i, j and
  ``diag_offset = Sb - Lb`` if ``bottom_right`` else 0. No bias.
* dropout: entry (b, h, i, j) is kept iff ``hash(seed, h * Tq + cu_seqlens_q[b] + i, j) >= p * 2**32``
  (the packed row's global index, the key's local index).
* out ``(Tq, Hq, Ev)`` contiguous in q's dtype; lse ``(Hq, Tq)`` float32 (float64 for float64 input),
  +inf for rows with nothing visible (and for a sequence with Sb = 0); grads contiguous, shaped like
  q, k, v.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastattn import _ext, backend as _backend
from fastattn.ops._autograd import refuse_double_backward

__all__ = ["scaled_dot_product_attention", "attention", "attention_varlen", "attention_reference",
           "attention_varlen_reference", "dropout_keep_mask", "varlen_dropout_keep_mask"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# The oracle: plain PyTorch math, also the `reference` backend.
# --------------------------------------------------------------------------------------------
def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (Wellons): a 32-bit integer hash, computed in int64 and kept to 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def dropout_threshold(p: float) -> int:
    """An entry is kept iff its 32-bit hash is >= this."""
    return min(int(p * 4294967296.0), _M32)


def _keep_from_rows(seed, row: Tensor, col: Tensor, p: float) -> Tensor:
    """Kept entries for hash rows ``row`` and columns ``col`` (broadcast); ``seed`` an int or int64 tensor."""
    if not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=row.device)
    seed_h = _mix32(seed.to(device=row.device, dtype=torch.int64) & _M32)
    return _mix32(_mix32(seed_h ^ (row & _M32)) ^ col) >= dropout_threshold(p)


def dropout_keep_mask(seed: int, B: int, H: int, L: int, S: int, p: float, device=None) -> Tensor:
    """Bool ``(B, H, L, S)``: which attention probabilities dropout keeps.

    ``hash = mix(mix(mix(seed) ^ row) ^ j)`` with ``row = (b*H + h)*L + i`` taken mod 2**32.
    """
    row = torch.arange(B * H * L, device=device, dtype=torch.int64).view(B, H, L, 1)
    col = torch.arange(S, device=device, dtype=torch.int64).view(1, 1, 1, S)
    return _keep_from_rows(seed, row, col, p)


def varlen_dropout_keep_mask(seed: int, H: int, total_q: int, q_start: int, L: int, S: int, p: float,
                             device=None) -> Tensor:
    """Bool ``(1, H, L, S)``: the kept entries of one packed sequence (query rows ``q_start:q_start+L``).

    The varlen contract's row is ``h * total_q + q_start + i``; the column the key's local index j.
    """
    row = (torch.arange(H, device=device, dtype=torch.int64).view(1, H, 1, 1) * total_q + q_start
           + torch.arange(L, device=device, dtype=torch.int64).view(1, 1, L, 1))
    col = torch.arange(S, device=device, dtype=torch.int64).view(1, 1, 1, S)
    return _keep_from_rows(seed, row, col, p)


def visible_mask(L: int, S: int, window_left: int, window_right: int, diag_offset: int, device=None):
    """Bool ``(L, S)``: key j visible to query i under the window/causal rule, or None if all are."""
    if window_left < 0 and window_right < 0:
        return None
    i = torch.arange(L, device=device).view(L, 1) + diag_offset
    j = torch.arange(S, device=device).view(1, S)
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= i - window_left
    if window_right >= 0:
        ok &= j <= i + window_right
    return ok


def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor] = None,
                        dropout_p: float = 0.0, scale: Optional[float] = None, window_left: int = -1,
                        window_right: int = -1, diag_offset: int = 0, softcap: float = 0.0,
                        seed: int = 0, compute_dtype: Optional[torch.dtype] = None,
                        keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The native contract in plain math on ``(B, H, L, E)`` tensors; differentiable by autograd.

    Computes in float32 (float64 for float64 input) unless ``compute_dtype`` says otherwise (the
    tests use it to get plain PyTorch's own low-precision error). ``keep`` (bool, broadcast to
    ``(B, H, L, S)``) replaces the dropout mask of ``seed`` (the varlen oracle passes its own);
    ``seed`` may be an int64 tensor (traceable by torch.compile).
    """
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    cdt = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if attn_bias is not None:
        s = s + attn_bias.to(cdt)
    vis = visible_mask(L, S, window_left, window_right, diag_offset, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach() if S > 0 else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # fully masked row: keep exp() at 0
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    empty = denom == 0
    lse = torch.where(empty, torch.full_like(denom, float("inf")), m + torch.log(denom)).squeeze(-1)
    p = p / torch.where(empty, torch.ones_like(denom), denom)
    if dropout_p > 0:
        if keep is None:
            keep = dropout_keep_mask(seed, B, Hq, L, S, dropout_p, q.device)
        p = p * keep.to(cdt) / (1.0 - dropout_p)
    out = torch.matmul(p, v.to(cdt))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)


def _offsets(cu) -> List[int]:
    return [int(x) for x in (cu.tolist() if isinstance(cu, Tensor) else cu)]


def attention_varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k, dropout_p: float = 0.0,
                               scale: Optional[float] = None, window_left: int = -1, window_right: int = -1,
                               bottom_right: bool = True, softcap: float = 0.0, seed=0,
                               compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """The varlen contract in plain math: :func:`attention_reference` on each sequence's rows, with the
    packed dropout rows. ``(total_q, Hq, E)`` inputs; returns ``out (total_q, Hq, Ev)``, ``lse (Hq, total_q)``.
    Differentiable by autograd; ``cu_seqlens_*`` tensors or lists.
    """
    Tq, Hq, E = q.shape
    oq, ok = _offsets(cu_seqlens_q), _offsets(cu_seqlens_k)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    outs, lses = [], []
    for b in range(len(oq) - 1):
        (q0, q1), (k0, k1) = oq[b:b + 2], ok[b:b + 2]
        L, S = q1 - q0, k1 - k0
        keep = varlen_dropout_keep_mask(seed, Hq, Tq, q0, L, S, dropout_p, q.device) if dropout_p > 0 else None
        o, lse = attention_reference(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                     v[k0:k1].transpose(0, 1)[None], None, dropout_p, scale, window_left,
                                     window_right, S - L if bottom_right else 0, softcap, 0, compute_dtype, keep)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


# --------------------------------------------------------------------------------------------
# Native ops: autograd and fake (meta) kernels.
# --------------------------------------------------------------------------------------------
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset, softcap, seed):
    B, Hq, L, _ = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    lse = q.new_empty((B, Hq, L), dtype=_lse_dtype(q.dtype))
    return out, lse


def _bwd_fake(grad_out, q, k, v, out, lse, attn_bias, dropout_p, scale, window_left, window_right,
              diag_offset, softcap, seed):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def make_attention_autograd(bwd_op):
    """(setup_context, backward) for an attention forward op whose backward op is ``bwd_op``."""
    def setup_context(ctx, inputs, output):
        q, k, v, attn_bias, *params = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_bias)
        ctx.params = params

    def backward(ctx, grad_out, grad_lse):
        # lse is handed to users detached (see `attention`), so grad_lse carries nothing.
        q, k, v, out, lse, attn_bias = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        refuse_double_backward("attention", grad_out, q, k, v)
        dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, attn_bias, *ctx.params)
        return (dq, dk, dv) + (None,) * 8

    return setup_context, backward


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                     window_left, window_right, bottom_right, softcap, seed):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))
    return out, lse


def _varlen_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                     scale, window_left, window_right, bottom_right, softcap, seed):
    return _bwd_fake(grad_out, q, k, v, out, lse, None, dropout_p, scale, window_left, window_right, 0, softcap, seed)


def make_attention_varlen_autograd(bwd_op):
    """(setup_context, backward) for a varlen forward op (native contract) whose backward op is ``bwd_op``."""
    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, *params = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.params = params

    def backward(ctx, grad_out, grad_lse):
        # lse is handed to users detached (see `attention_varlen`), so grad_lse carries nothing.
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        refuse_double_backward("attention_varlen", grad_out, q, k, v)
        dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.params)
        return (dq, dk, dv) + (None,) * 11

    return setup_context, backward


def _register(fwd_name: str, bwd_name: str, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
              make_autograd=make_attention_autograd):
    """Fake kernels of both ops; the forward's autograd in Python (make_autograd), unless the extension
    has one in C++ already (attention_fwd: csrc/cpu/attention.cpp)."""
    fwd = getattr(torch.ops.fastattn, fwd_name)
    bwd = getattr(torch.ops.fastattn, bwd_name)
    torch.library.register_fake(f"fastattn::{fwd_name}")(fwd_fake)
    torch.library.register_fake(f"fastattn::{bwd_name}")(bwd_fake)
    if make_autograd is not None:
        setup_context, backward = make_autograd(bwd)
        torch.library.register_autograd(f"fastattn::{fwd_name}", backward, setup_context=setup_context)
    return fwd


def _has_cpp_autograd(op_name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op_name}", "Autograd")


_native_fwd = None
if _ext.available() and hasattr(torch.ops.fastattn, "attention_fwd"):
    # attention_fwd's autograd is in C++ in this build (a Python autograd kernel cost tens of µs per call)
    _native_fwd = _register("attention_fwd", "attention_bwd",
                            make_autograd=None if _has_cpp_autograd("attention_fwd") else make_attention_autograd)
_native_varlen_fwd = None
if _ext.available() and hasattr(torch.ops.fastattn, "attention_varlen_fwd"):
    _native_varlen_fwd = _register("attention_varlen_fwd", "attention_varlen_bwd", _varlen_fwd_fake,
                                   _varlen_bwd_fake, make_attention_varlen_autograd)


def _triton_op():
    """The Triton forward (differentiable; its module registers ops, fake kernels and autograd).

    Imported on first use: importing triton is slow.
    """
    from fastattn.triton.attention import triton_attention_fwd
    return triton_attention_fwd


# --------------------------------------------------------------------------------------------
# Input checks: clear errors naming the argument, before any kernel runs.
# --------------------------------------------------------------------------------------------
def _check_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                  enable_gqa: bool) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., seq_len, head_dim), got a {t.dim()}-D tensor")
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"query, key and value must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query and key must have the same head size (last dim), got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key and value must have the same sequence length (dim -2), got {k.shape[-2]} and {v.shape[-2]}")
    if q.shape[:-3] != k.shape[:-3] or k.shape[:-3] != v.shape[:-3]:
        raise ValueError(f"query, key and value must have the same batch dims, got {tuple(q.shape[:-3])}, "
                         f"{tuple(k.shape[:-3])}, {tuple(v.shape[:-3])}")
    if q.dim() >= 3:
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if hk != hv:
            raise ValueError(f"key and value must have the same number of heads (dim -3), got {hk} and {hv}")
        if hq != hk:
            if not enable_gqa:
                raise ValueError(f"query has {hq} heads and key {hk}: pass enable_gqa=True for grouped-query attention")
            if hk == 0 or hq % hk != 0:
                raise ValueError(f"enable_gqa needs query heads ({hq}) divisible by key/value heads ({hk})")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on the query's device {q.device}, got {attn_mask.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        # torch's broadcasting rule, without torch.broadcast_shapes (tens of µs per call through _refs).
        target = tuple(q.shape[:-1]) + (k.shape[-2],)
        shape = tuple(attn_mask.shape)
        ok = len(shape) <= len(target) and all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., L, S) = {target}")


def _window(window_size: Sequence[int], causal: bool, causal_align: str, softcap: float) -> Tuple[int, int]:
    """Checks the richer API's mask arguments; returns (window_left, window_right) with causal folded in."""
    if causal_align not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}")
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    wl, wr = int(window_size[0]), int(window_size[1])
    if wl < -1 or wr < -1:
        raise ValueError(f"window_size entries must be >= 0 or -1 (unbounded), got {window_size!r}")
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    return wl, wr


def _to_4d(t: Tensor) -> Tensor:
    """(*batch, H, L, E) -> (B, H, L, E); a missing head or batch dim becomes 1."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape((-1,) + tuple(t.shape[-3:]))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _mask_to_bias(attn_mask: Tensor, q4: Tensor, target_shape) -> Tensor:
    """bool (True = attend) or float mask -> additive bias in q's dtype, as (B, Hq, L, S).

    ``target_shape`` is the caller's ``(..., L, S)``. Broadcast dims stay stride-0 views: the bias is
    only ever as large as the mask itself, except when several batch dims (rank >= 5) cannot be merged
    into one stride (e.g. a mask that varies along the first batch dim but not the second); then only
    the batch dims are materialised, the head, query and key dims keep their broadcast.
    """
    if attn_mask.dtype == torch.bool:  # one op (in fp32): where() with scalars takes the default float dtype
        bias = torch.where(attn_mask, 0.0, float("-inf"))
        if bias.dtype != q4.dtype:
            bias = bias.to(q4.dtype)
    else:
        bias = attn_mask.to(q4.dtype)
    B, Hq, L, _ = q4.shape
    S = target_shape[-1]
    full = bias.expand(target_shape)
    try:
        return full.view(B, Hq, L, S)
    except RuntimeError:  # batch dims with strides that no single stride describes
        pass
    bias = bias.reshape((1,) * (len(target_shape) - bias.dim()) + tuple(bias.shape))
    tail = tuple(bias.shape[-3:])  # the mask's own (heads, L, S): 1 where it broadcasts
    per_batch = bias.expand(tuple(target_shape[:-3]) + tail).contiguous().view((B,) + tail)
    return per_batch.expand(B, Hq, L, S)


# --------------------------------------------------------------------------------------------
# Backend choice.
# --------------------------------------------------------------------------------------------
def _reasons(dtype: torch.dtype, big_head: bool, bias_grad: bool):
    """What each backend lacks for an input: ``big_head`` = a head size (E or Ev) above 256."""
    def common() -> List[str]:
        return ["a float attn_mask that requires grad (only the reference backend differentiates it)"] if bias_grad else []

    def gpu(kernel: str) -> List[str]:
        why = common()
        if dtype == torch.float64:
            why.append(f"float64 input (the {kernel} kernel takes float16, bfloat16, float32)")
        if big_head:
            why.append("head size > 256")
        return why

    return {"cpu": common, "cuda": lambda: gpu("CUDA"), "triton": lambda: gpu("Triton"), "reference": lambda: []}


@torch.compiler.assume_constant_result
def _select(backend: Optional[str], device: torch.device, dtype: torch.dtype, big_head: bool, bias_grad: bool) -> str:
    """The backend for one call, from Python constants only: torch.compile runs this while tracing and
    bakes the answer into the graph (the registry look-ups inside are not traceable; a later
    ``fastattn.set_backend`` does not reach graphs already compiled)."""
    return _backend.select("attention", backend, device, _reasons(dtype, big_head, bias_grad),
                           native_op="attention_fwd")


def _kernel_ops(backend_name: str):
    """(forward, backward) of the native contract for the kernel backends cpu, cuda, triton."""
    if backend_name == "triton":
        from fastattn.triton.attention import triton_attention_bwd, triton_attention_fwd
        return triton_attention_fwd, triton_attention_bwd
    return torch.ops.fastattn.attention_fwd, torch.ops.fastattn.attention_bwd


# Dropout with a drawn seed. The seed comes from torch's generator as a 0-d int64 CPU tensor
# (torch.randint: traceable, and torch.manual_seed makes it reproducible); these two ops read it
# (.item()) when they run, so torch.compile traces the whole call without a graph break. They wrap
# the kernel backends' ops of the same contract (the backend's name is an argument).
@torch.library.custom_op("fastattn::attention_fwd_drawn_seed", mutates_args=())
def _fwd_drawn_seed(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], dropout_p: float, scale: float,
                    window_left: int, window_right: int, diag_offset: int, softcap: float, seed: Tensor,
                    backend: str) -> Tuple[Tensor, Tensor]:
    fwd, _ = _kernel_ops(backend)
    out, lse = fwd(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset, softcap, int(seed))
    return out, lse


@torch.library.custom_op("fastattn::attention_bwd_drawn_seed", mutates_args=())
def _bwd_drawn_seed(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    attn_bias: Optional[Tensor], dropout_p: float, scale: float, window_left: int, window_right: int,
                    diag_offset: int, softcap: float, seed: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _, bwd = _kernel_ops(backend)
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, attn_bias, dropout_p, scale, window_left, window_right,
                     diag_offset, softcap, int(seed))
    return dq, dk, dv


@_fwd_drawn_seed.register_fake
def _(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset, softcap, seed, backend):
    return _fwd_fake(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset, softcap, 0)


@_bwd_drawn_seed.register_fake
def _(grad_out, q, k, v, out, lse, attn_bias, dropout_p, scale, window_left, window_right, diag_offset, softcap,
      seed, backend):
    return _bwd_fake(grad_out, q, k, v, out, lse, attn_bias, dropout_p, scale, window_left, window_right,
                     diag_offset, softcap, 0)


def _drawn_seed_setup_context(ctx, inputs, output):
    q, k, v, bias, dropout_p, scale, wl, wr, diag, softcap, seed, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], bias, seed)
    ctx.params = (dropout_p, scale, wl, wr, diag, softcap)
    ctx.backend = backend


def _drawn_seed_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    refuse_double_backward("attention", grad_out, q, k, v)
    dq, dk, dv = _bwd_drawn_seed(grad_out.contiguous(), q, k, v, out, lse, bias, *ctx.params, seed, ctx.backend)
    return (dq, dk, dv) + (None,) * 9


_fwd_drawn_seed.register_autograd(_drawn_seed_backward, setup_context=_drawn_seed_setup_context)


def _run(backend_name: str, q, k, v, bias, dropout_p, scale, wl, wr, diag, softcap, seed):
    """``seed``: an int, or a drawn 0-d int64 tensor (see _fwd_drawn_seed)."""
    if backend_name == "reference":
        return attention_reference(q, k, v, bias, dropout_p, scale, wl, wr, diag, softcap, seed)
    if isinstance(seed, Tensor):
        return _fwd_drawn_seed(q, k, v, bias, dropout_p, scale, wl, wr, diag, softcap, seed, backend_name)
    op = _triton_op() if backend_name == "triton" else _native_fwd
    return op(q, k, v, bias, dropout_p, scale, wl, wr, diag, softcap, seed)


def _draw_seed_tensor() -> Tensor:
    """A dropout seed from torch's default generator, as a 0-d int64 CPU tensor (no .item(): traceable)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def _draw_seed(dropout_p: float) -> int:
    if dropout_p == 0.0:
        return 0
    return int(_draw_seed_tensor().item())


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------
def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, *, window_size: Sequence[int] = (-1, -1),
              causal_align: str = "top_left", softcap: float = 0.0, return_lse: bool = False,
              seed: Optional[int] = None, backend: Optional[str] = None):
    """Attention with what torch's signature lacks.

    * ``window_size=(left, right)``: sliding window, -1 = unbounded (flash-attn's convention);
      ``causal=True`` sets ``right = 0``.
    * ``causal_align``: ``"top_left"`` (torch: query i sees keys ``j <= i``) or ``"bottom_right"``
      (flash-attn: the last query sees the last key, ``j <= i + S - L``).
    * ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)`` before the mask.
    * ``return_lse=True`` also returns the log-sum-exp ``(..., L)`` (float32, float64 for float64 input; ``-inf`` for a row
      with nothing to attend to), detached.
    * ``seed``: the dropout mask's seed (drawn from torch's generator when None, so
      ``torch.manual_seed`` makes dropout reproducible; ``torch.compile(fullgraph=True)`` traces the draw).
    """
    _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa)
    wl, wr = _window(window_size, causal, causal_align, softcap)

    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    q = _last_dim_contiguous(_to_4d(query))
    k = _last_dim_contiguous(_to_4d(key))
    v = _last_dim_contiguous(_to_4d(value))
    bias = None if attn_mask is None else _mask_to_bias(attn_mask, q, tuple(query.shape[:-1]) + (S,))
    diag = (S - L) if causal_align == "bottom_right" else 0
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(E) if E > 0 else 1.0
    if seed is not None:
        seed = int(seed)
    else:  # drawn; a tensor, so that torch.compile traces the draw (see _fwd_drawn_seed)
        seed = _draw_seed_tensor() if dropout_p > 0 else 0

    big_head = True if max(q.shape[-1], v.shape[-1]) > 256 else False  # a branch: a constant under torch.compile
    name = _select(backend, q.device, q.dtype, big_head, bias is not None and bias.requires_grad)
    out, lse = _run(name, q, k, v, bias, float(dropout_p), scale, wl, wr, diag, float(softcap), seed)

    out = out.reshape(tuple(query.shape[:-1]) + (value.shape[-1],))
    if not return_lse:
        return out
    lse = lse.detach()
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    return out, lse.reshape(tuple(query.shape[:-1]))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same arguments, same semantics).

    A row with nothing to attend to gives 0 (as torch's kernels do), not NaN.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as torch requires)")
    return attention(query, key, value, attn_mask, dropout_p, causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa, backend=backend)


def _cu_seqlens(name: str, cu, total: int, device: torch.device) -> Tuple[Tensor, List[int]]:
    """Checked offsets: a contiguous int32 tensor on ``device`` and the same as a list."""
    if isinstance(cu, (list, tuple)) and all(isinstance(x, int) for x in cu):
        cu = torch.tensor(cu, dtype=torch.int64)
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor (or list of ints) of batch+1 >= 2 offsets, got "
                         f"{tuple(cu.shape) if isinstance(cu, Tensor) else type(cu).__name__}"
                         f"{' ' + str(cu.dtype) if isinstance(cu, Tensor) else ''}")
    offsets = [int(x) for x in cu.tolist()]
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] != total:
        shown = offsets if len(offsets) <= 20 else offsets[:10] + ["..."] + offsets[-5:]
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, got {shown}")
    if total >= 2**31:
        raise ValueError(f"{name}: packed length {total} does not fit int32")
    return cu.to(device=device, dtype=torch.int32).contiguous(), offsets


def _cu_seqlens_traced(name: str, cu, total: int, device: torch.device) -> Tensor:
    """``_cu_seqlens`` without reading the values (under torch.compile): kind, dtype, rank and length
    are checked here; the values (from 0, non-decreasing, to ``total``, each length <= max_seqlen)
    by the kernel's own checks (TORCH_CHECK in C++)."""
    if isinstance(cu, (list, tuple)):
        cu = torch.tensor(cu, dtype=torch.int32, device=device)
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor (or list of ints) of batch+1 >= 2 offsets")
    if total >= 2**31:
        raise ValueError(f"{name}: packed length {total} does not fit int32")
    return cu.to(device=device, dtype=torch.int32).contiguous()


def _check_max_seqlen(name: str, given: Optional[int], lens: List[int]) -> int:
    longest = max(lens)
    if given is None:
        return longest
    if isinstance(given, bool) or not isinstance(given, int):
        raise TypeError(f"{name} must be an int or None, got {type(given).__name__}")
    if longest > given:
        raise ValueError(f"a sequence has {longest} rows > {name}={given}")
    return given


def _varlen_reasons(dtype: torch.dtype, big_head: bool):
    """What each backend lacks for a varlen input; ``big_head`` = a head size (E or Ev) above 256."""
    def gpu(kernel: str) -> List[str]:
        why = []
        if dtype == torch.float64:
            why.append(f"float64 input (the {kernel} kernel takes float16, bfloat16, float32)")
        if big_head:
            why.append("head size > 256")
        return why

    def triton() -> List[str]:
        try:
            _triton_varlen_op()
        except (ImportError, AttributeError) as e:
            return [f"this build's Triton attention has no varlen kernel ({type(e).__name__}: {e})"]
        return gpu("Triton")

    return {"cpu": lambda: [], "cuda": lambda: gpu("CUDA"), "triton": triton, "reference": lambda: []}


@torch.compiler.assume_constant_result
def _select_varlen(backend: Optional[str], device: torch.device, dtype: torch.dtype, big_head: bool) -> str:
    """The varlen backend for one call, from Python constants only (as ``_select``: torch.compile bakes
    the answer into the graph)."""
    return _backend.select("attention_varlen", backend, device, _varlen_reasons(dtype, big_head),
                           native_op="attention_varlen_fwd")


def _triton_varlen_op():
    """The Triton varlen forward (native contract, differentiable), imported on first use."""
    from fastattn.triton.attention import triton_attention_varlen_fwd
    return triton_attention_varlen_fwd


def attention_varlen(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                     dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None, *,
                     window_size: Sequence[int] = (-1, -1), causal_align: str = "bottom_right",
                     softcap: float = 0.0, return_lse: bool = False, seed: Optional[int] = None,
                     backend: Optional[str] = None):
    """Attention over a packed batch of variable-length sequences (flash-attn's varlen convention), one
    kernel call for the whole batch.

    ``query`` ``(total_q, Hq, E)``, ``key``/``value`` ``(total_k, Hkv, E|Ev)``; sequence ``i`` is rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of query and ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of key/value
    (int32 or int64 tensors, or lists of ints; sequences may be empty). ``Hq != Hkv`` is grouped-query
    attention (``Hq % Hkv == 0``). Causal masks and windows align bottom-right by default, as flash-attn's
    (``causal_align="top_left"`` for torch's). ``max_seqlen_q/k`` (computed when None) must bound every
    sequence. ``window_size``, ``softcap``, ``dropout_p``, ``seed``, ``backend`` as in :func:`attention`.

    Returns ``(total_q, Hq, Ev)``, and with ``return_lse`` also the log-sum-exp as ``(total_q, Hq)``
    float32 (float64 for float64 input), row-aligned with the output (flash-attn returns ``(Hq, total_q)``;
    ``lse.t()`` gives that), ``-inf`` for a row with nothing to attend to, detached.

    Eagerly the offsets are read on the host for the checks (a sync for CUDA tensors). Under
    ``torch.compile`` they are not (the call traces with ``fullgraph=True``): pass ``max_seqlen_q/k``
    as ints, and the kernels check the offsets' values themselves; dropout then needs an explicit
    ``seed``, and the ``reference`` backend (which loops over the sequences on the host) breaks the graph.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a packed (total, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same head size (last dim), got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key and value must have the same (total_k, heads), got {tuple(key.shape[:2])} and "
                         f"{tuple(value.shape[:2])}")
    hq, hk = query.shape[1], key.shape[1]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk}) (grouped-query attention)")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    wl, wr = _window(window_size, causal, causal_align, softcap)

    if torch.compiler.is_compiling():  # no host reads of the offsets (they would break the graph)
        for name_, given in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if given is None or isinstance(given, bool) or not isinstance(given, int):
                raise ValueError(f"under torch.compile, attention_varlen needs {name_} as an int (reading it "
                                 f"from the offsets would break the graph), got {given!r}")
        if dropout_p > 0 and seed is None:
            raise ValueError("under torch.compile, attention_varlen with dropout needs an explicit seed")
        cu_q = _cu_seqlens_traced("cu_seqlens_q", cu_seqlens_q, query.shape[0], query.device)
        cu_k = _cu_seqlens_traced("cu_seqlens_k", cu_seqlens_k, key.shape[0], query.device)
        if cu_q.shape[0] != cu_k.shape[0]:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_q.shape[0] - 1} "
                             f"and {cu_k.shape[0] - 1} sequences")
        oq, ok, max_q, max_k = cu_q, cu_k, max_seqlen_q, max_seqlen_k
    else:
        cu_q, oq = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, query.shape[0], query.device)
        cu_k, ok = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, key.shape[0], query.device)
        if len(oq) != len(ok):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {len(oq) - 1} and "
                             f"{len(ok) - 1} sequences")
        max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, [b - a for a, b in zip(oq, oq[1:])])
        max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, [b - a for a, b in zip(ok, ok[1:])])

    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    E = q.shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(E) if E > 0 else 1.0
    seed = _draw_seed(dropout_p) if seed is None else int(seed)
    bottom_right = causal_align == "bottom_right"

    big_head = True if max(q.shape[-1], v.shape[-1]) > 256 else False  # a branch: a constant under torch.compile
    name = _select_varlen(backend, q.device, q.dtype, big_head)
    args = (float(dropout_p), scale, wl, wr, bottom_right, float(softcap), seed)
    if name == "reference":
        out, lse = attention_varlen_reference(q, k, v, oq, ok, *args)
    else:
        op = _triton_varlen_op() if name == "triton" else _native_varlen_fwd
        out, lse = op(q, k, v, cu_q, cu_k, max_q, max_k, *args)
    if not return_lse:
        return out
    lse = lse.detach().t().contiguous()
    return out, torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
