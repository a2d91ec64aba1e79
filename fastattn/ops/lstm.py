"""LSTM: one cell step and one whole layer (every time step in one native call), forward and backward.

Native contract (csrc/cpu/lstm.cpp holds the schemas; every backend is held to the reference below):

    lstm_cell_fwd(input (B, I), hx (B, H), cx (B, H), w_ih (4H, I), w_hh (4H, H), b_ih?, b_hh?)
        -> (hy, cy, gates)           gates: the activated (i, f, g, o), (B, 4H), float32 workspace
    lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, cy, w_ih, w_hh, gates)
        -> (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias)
    lstm_layer_fwd(input (T, B, I), h0 (B, P), c0 (B, H), w_ih (4H, I), w_hh (4H, P), b_ih?, b_hh?,
                   w_hr? (P, H), reverse, lengths? (B,) int64 CPU)
        -> (output (T, B, P), h_n, c_n, gates (T, B, 4H), cells (T, B, H), hidden (T, B, H) or (0,))
    lstm_layer_bwd(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr?, output, gates,
                   cells, hidden, reverse, lengths?)
        -> (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr or (0,))
    lstm_layer_infer(same arguments as lstm_layer_fwd) -> (output, h_n, c_n)
                     CPU only, not differentiable: lstm_layer_fwd without the workspace, which
                     ``lstm`` calls when nothing will be differentiated (no_grad, or no argument
                     requires grad)

    lstm_bidir_layer_fwd(input, h0, c0, h0_reverse, c0_reverse, w_ih, w_hh, b_ih?, b_hh?, w_hr?,
                         w_ih_reverse, w_hh_reverse, b_ih_reverse?, b_hh_reverse?, w_hr_reverse?, lengths?,
                         concurrent)
        -> (output, h_n, c_n, output_reverse, h_n_reverse, c_n_reverse, gates, cells, hidden,
            gates_reverse, cells_reverse, hidden_reverse)
                     both directions of a bidirectional layer: lstm_layer_fwd(reverse=False) and
                     lstm_layer_fwd(reverse=True) bit for bit; ``concurrent`` runs each direction on its
                     own thread (when torch has >= 2 threads). CPU only.
    lstm_bidir_layer_infer(same arguments) -> (output, h_n, c_n, output_reverse, h_n_reverse, c_n_reverse)
    lstm_bidir_layer_bwd(grad_output, grad_h_n, grad_c_n, grad_*_reverse (3), input, h0, c0, h0_reverse,
                         c0_reverse, w_ih, w_hh, w_hr?, w_ih_reverse, w_hh_reverse, w_hr_reverse?, output, gates,
                         cells, hidden, output_reverse, gates_reverse, cells_reverse, hidden_reverse, lengths?,
                         concurrent)
        -> (grad_input (both directions' summed), grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr,
            and the same six for the reverse direction)

* Gate order is torch's (i, f, g, o); ``c' = f*c + i*g``, ``h' = (o*tanh(c')) W_hr^T`` (no W_hr:
  ``P = H`` and ``h' = o*tanh(c')``). ``grad_bias`` is the gradient of ``b_ih`` and of ``b_hh``.
* ``reverse`` runs the steps from T-1 down to 0. ``lengths``: batch row b takes part in step t iff
  ``t < lengths[b]``; elsewhere its state is carried unchanged and its output is 0. So the forward
  direction stops each row at its length and the reverse direction starts it at its own last step,
  which is what a ``PackedSequence`` means. ``1 <= lengths[b] <= T``, any order.
* The workspace (gates, cells, hidden) is float32 for float16/bfloat16/float32 input and float64 for
  float64; the outputs and every gradient have the input's dtype. bf16/fp16 compute in fp32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastattn import _ext, backend as _backend

__all__ = ["lstm_cell", "lstm", "lstm_bidir", "lstm_cell_reference", "lstm_layer_reference"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# The oracle: plain PyTorch math, also the `reference` backend (differentiable by autograd).
# --------------------------------------------------------------------------------------------
def _cell_math(x_proj: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Optional[Tensor]):
    gates = x_proj + h @ w_hh.t()
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lstm_cell_reference(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
                        b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    cdt = _compute_dtype(input.dtype)
    up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    xp = input.to(cdt) @ w_ih.to(cdt).t()
    if b_ih is not None:
        xp = xp + up(b_ih)
    h, c = _cell_math(xp, hx.to(cdt), cx.to(cdt), w_hh.to(cdt), up(b_hh))
    return h.to(input.dtype), c.to(input.dtype)


def lstm_layer_reference(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                         b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
                         w_hr: Optional[Tensor] = None, reverse: bool = False,
                         lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The layer contract with a Python loop over steps: ``(output, h_n, c_n)``."""
    cdt = _compute_dtype(input.dtype)
    up = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    T, B = input.shape[0], input.shape[1]
    xp = input.to(cdt) @ w_ih.to(cdt).t()
    if b_ih is not None:
        xp = xp + up(b_ih)
    h, c = h0.to(cdt), c0.to(cdt)
    w_hh, b_hh, w_hr = up(w_hh), up(b_hh), up(w_hr)
    outs: List[Optional[Tensor]] = [None] * T
    for s in range(T):
        t = T - 1 - s if reverse else s
        hn, cn = _cell_math(xp[t], h, c, w_hh, b_hh)
        if w_hr is not None:
            hn = hn @ w_hr.t()
        if lengths is not None:
            act = (t < lengths.to(input.device)).view(B, 1)
            h, c = torch.where(act, hn, h), torch.where(act, cn, c)
            outs[t] = torch.where(act, hn, torch.zeros_like(hn))
        else:
            h, c = hn, cn
            outs[t] = hn
    return torch.stack(outs).to(input.dtype), h.to(input.dtype), c.to(input.dtype)


# --------------------------------------------------------------------------------------------
# Native ops: fake kernels and autograd (the backward of each op is itself a registered op).
# --------------------------------------------------------------------------------------------
def _same_device(input, *tensors):
    # A meta argument next to CPU ones dispatches here: refuse, as the real kernels do (the thin call
    # paths of lstm_cell / lstm then take the full path, which names the argument).
    for t in tensors:
        if t is not None and t.device != input.device:
            raise ValueError(f"fastattn lstm: every tensor must be on the input's device {input.device}, got {t.device}")


def _cell_fwd_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    _same_device(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    B, H = hx.shape
    return (input.new_empty((B, H)), input.new_empty((B, H)),
            input.new_empty((B, 4 * H), dtype=_compute_dtype(input.dtype)))


def _cell_bwd_fake(grad_hy, grad_cy, input, hx, cx, cy, w_ih, w_hh, gates):
    e = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return e(input), e(hx), e(cx), e(w_ih), e(w_hh), input.new_empty((w_ih.shape[0],))


def _layer_fwd_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths):
    _same_device(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    T, B, _ = input.shape
    H = w_ih.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    wdt = _compute_dtype(input.dtype)
    hidden = input.new_empty((T, B, H) if w_hr is not None else (0,), dtype=wdt)
    return (input.new_empty((T, B, P)), input.new_empty((B, P)), input.new_empty((B, H)),
            input.new_empty((T, B, 4 * H), dtype=wdt), input.new_empty((T, B, H), dtype=wdt), hidden)


def _layer_infer_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths):
    return _layer_fwd_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths)[:3]


def _layer_bwd_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, output, gates, cells,
                    hidden, reverse, lengths):
    e = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    dwr = e(w_hr) if w_hr is not None else input.new_empty((0,))
    return e(input), e(h0), e(c0), e(w_ih), e(w_hh), input.new_empty((w_ih.shape[0],)), dwr


def _bidir_fwd_fake(input, h0, c0, h0_r, c0_r, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
                    w_hr_r, lengths, concurrent):
    f = _layer_fwd_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, False, lengths)
    r = _layer_fwd_fake(input, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, True, lengths)
    return f[:3] + r[:3] + f[3:] + r[3:]


def _bidir_infer_fake(*args):
    return _bidir_fwd_fake(*args)[:6]


def _bidir_bwd_fake(go, ghn, gcn, go_r, ghn_r, gcn_r, input, h0, c0, h0_r, c0_r, w_ih, w_hh, w_hr, w_ih_r, w_hh_r,
                    w_hr_r, output, gates, cells, hidden, output_r, gates_r, cells_r, hidden_r, lengths, concurrent):
    f = _layer_bwd_fake(go, ghn, gcn, input, h0, c0, w_ih, w_hh, w_hr, output, gates, cells, hidden, False, lengths)
    r = _layer_bwd_fake(go_r, ghn_r, gcn_r, input, h0_r, c0_r, w_ih_r, w_hh_r, w_hr_r, output_r, gates_r, cells_r,
                        hidden_r, True, lengths)
    return f + r[1:]


def _bidir_setup_context(ctx, inputs, output):
    (input, h0, c0, h0_r, c0_r, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r,
     lengths, concurrent) = inputs
    out, _, _, out_r, _, _, gates, cells, hidden, gates_r, cells_r, hidden_r = output
    ctx.save_for_backward(input, h0, c0, h0_r, c0_r, w_ih, w_hh, w_hr, w_ih_r, w_hh_r, w_hr_r, out, gates, cells,
                          hidden, out_r, gates_r, cells_r, hidden_r, lengths)
    ctx.has_bias = (b_ih is not None, b_hh is not None, b_ih_r is not None, b_hh_r is not None)
    ctx.concurrent = concurrent
    ctx.mark_non_differentiable(gates, cells, hidden, gates_r, cells_r, hidden_r)


def _bidir_backward(ctx, go, ghn, gcn, go_r, ghn_r, gcn_r, *_workspace_grads):
    (input, h0, c0, h0_r, c0_r, w_ih, w_hh, w_hr, w_ih_r, w_hh_r, w_hr_r, out, gates, cells, hidden, out_r, gates_r,
     cells_r, hidden_r, lengths) = ctx.saved_tensors
    z = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
    (dx, dh0, dc0, dwi, dwh, db, dwr, dh0_r, dc0_r, dwi_r, dwh_r, db_r, dwr_r) = torch.ops.fastattn.lstm_bidir_layer_bwd(
        z(go, out), z(ghn, h0), z(gcn, c0), z(go_r, out_r), z(ghn_r, h0_r), z(gcn_r, c0_r), input, h0, c0, h0_r, c0_r,
        w_ih, w_hh, w_hr, w_ih_r, w_hh_r, w_hr_r, out, gates, cells, hidden, out_r, gates_r, cells_r, hidden_r,
        lengths, ctx.concurrent)
    bi, bh, bi_r, bh_r = ctx.has_bias
    return (dx, dh0, dc0, dh0_r, dc0_r, dwi, dwh, db if bi else None, db if bh else None,
            dwr if w_hr is not None else None, dwi_r, dwh_r, db_r if bi_r else None, db_r if bh_r else None,
            dwr_r if w_hr_r is not None else None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastattn LSTM: double backward (differentiating the gradient) is not supported; "
                       "use backend='reference' for higher-order gradients")


def _register():
    lib = torch.ops.fastattn
    torch.library.register_fake("fastattn::lstm_cell_fwd")(_cell_fwd_fake)
    torch.library.register_fake("fastattn::lstm_cell_bwd")(_cell_bwd_fake)
    torch.library.register_fake("fastattn::lstm_layer_fwd")(_layer_fwd_fake)
    torch.library.register_fake("fastattn::lstm_layer_bwd")(_layer_bwd_fake)
    if hasattr(lib, "lstm_layer_infer"):
        torch.library.register_fake("fastattn::lstm_layer_infer")(_layer_infer_fake)
    # lstm_cell_fwd's and lstm_layer_fwd's autograd is in C++ (csrc/cpu/lstm.cpp): the per-call cost of
    # a Python autograd wrapper matters at hidden 50 (a cell step is a few microseconds, a seed-sized
    # layer ~100).
    for name in ("lstm_cell_bwd", "lstm_layer_bwd"):
        torch.library.register_autograd(f"fastattn::{name}", _no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)
    if hasattr(lib, "lstm_bidir_layer_fwd"):
        torch.library.register_fake("fastattn::lstm_bidir_layer_fwd")(_bidir_fwd_fake)
        torch.library.register_fake("fastattn::lstm_bidir_layer_infer")(_bidir_infer_fake)
        torch.library.register_fake("fastattn::lstm_bidir_layer_bwd")(_bidir_bwd_fake)
        torch.library.register_autograd("fastattn::lstm_bidir_layer_fwd", _bidir_backward,
                                        setup_context=_bidir_setup_context)
        torch.library.register_autograd("fastattn::lstm_bidir_layer_bwd", _no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)
    return lib.lstm_cell_fwd.default, lib.lstm_layer_fwd.default


_cell_op = _layer_op = _cell_op_raw = _layer_op_raw = _layer_infer_raw = None
if _ext.available() and hasattr(torch.ops.fastattn, "lstm_layer_fwd"):
    _cell_op, _layer_op = _register()
    _layer_op_raw = getattr(_layer_op, "_op", _layer_op)
    if hasattr(torch.ops.fastattn, "lstm_layer_infer"):
        _layer_infer_raw = getattr(torch.ops.fastattn.lstm_layer_infer.default, "_op",
                                   torch.ops.fastattn.lstm_layer_infer.default)
    # The C++ entry point of the op (what OpOverload.__call__ forwards to): the thin call path of
    # lstm_cell, which at hidden 50 costs about as much as the kernel itself.
    _cell_op_raw = getattr(_cell_op, "_op", _cell_op)


# --------------------------------------------------------------------------------------------
# Input checks: clear errors naming the argument, before any kernel runs.
# --------------------------------------------------------------------------------------------
def _check_tensor(t, name: str, dim: Sequence[int], like: Optional[Tensor] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() not in dim:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dim)}-D, got shape {tuple(t.shape)}")
    if like is None:
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        return
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the input's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on the input's device {like.device}, got {t.device}")


def _check_weights(input: Tensor, w_ih, w_hh, b_ih, b_hh, w_hr, in_dim: int) -> Tuple[int, int]:
    """Checks the weights; returns (hidden_size H, output size P)."""
    _check_tensor(w_ih, "w_ih", (2,), input)
    _check_tensor(w_hh, "w_hh", (2,), input)
    G = w_ih.shape[0]
    if G % 4 != 0 or G == 0:
        raise ValueError(f"w_ih must be (4*hidden_size, input_size), got {tuple(w_ih.shape)}")
    H = G // 4
    if w_ih.shape[1] != in_dim:
        raise ValueError(f"input has {in_dim} features but w_ih expects input_size {w_ih.shape[1]}")
    P = H
    if w_hr is not None:
        _check_tensor(w_hr, "w_hr", (2,), input)
        if w_hr.shape[1] != H:
            raise ValueError(f"w_hr must be (proj_size, hidden_size={H}), got {tuple(w_hr.shape)}")
        P = w_hr.shape[0]
    if tuple(w_hh.shape) != (G, P):
        raise ValueError(f"w_hh must be (4*hidden_size, {'proj_size' if w_hr is not None else 'hidden_size'}) "
                         f"= {(G, P)}, got {tuple(w_hh.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(b, name, (1,), input)
            if b.shape[0] != G:
                raise ValueError(f"{name} must be (4*hidden_size,) = ({G},), got {tuple(b.shape)}")
    return H, P


def _check_state(t, name: str, want: Tuple[int, ...], input: Tensor) -> None:
    _check_tensor(t, name, (len(want),), input)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# Backend choice.
# --------------------------------------------------------------------------------------------
def _reasons(dtype: torch.dtype):
    def cuda_or_triton() -> List[str]:
        return ["float64 input (the GPU kernels take float16, bfloat16, float32)"] if dtype == torch.float64 else []

    return {"cpu": lambda: [], "cuda": cuda_or_triton, "triton": cuda_or_triton, "reference": lambda: []}


# Backend choice is the slow part of a small cell step: remember it per (request, device, dtype).
_choice_cache = {}


def _select(op: str, native: str, backend: Optional[str], x: Tensor) -> str:
    key = (op, backend if backend is not None else _backend.get_backend(), x.device, x.dtype,
           _backend.triton_interpret())
    name = _choice_cache.get(key)
    if name is None:
        name = _backend.select(op, backend, x.device, _reasons(x.dtype), native_op=native)
        _choice_cache[key] = name
    return name


def _triton():
    from fastattn.triton import lstm as triton_lstm  # imported on first use: importing triton is slow
    return triton_lstm


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------
def lstm_cell(input: Tensor, hx: Tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step, like ``torch.nn.LSTMCell``: ``input (B, I)`` or unbatched ``(I,)``, ``hx = (h, c)``
    each ``(B, H)`` (or ``(H,)``), weights ``w_ih (4H, I)``, ``w_hh (4H, H)``. Returns ``(h', c')``."""
    if backend is None and _cell_op_raw is not None and _backend._default == "auto":
        # Thin path: the native kernel checks every argument itself (TORCH_CHECK); if it refuses
        # (or no kernel runs this device/dtype), the full path below gives the clear Python error
        # or picks another backend.
        try:
            if input.dim() == 2:
                h, c = hx
                hy, cy, _ = _cell_op_raw(input, h, c, w_ih, w_hh, b_ih, b_hh)
                return hy, cy
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, IndexError):
            pass
    _check_tensor(input, "input", (1, 2))
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError("hx must be a tuple (h, c)")
    h, c = hx
    H, P = _check_weights(input, w_ih, w_hh, b_ih, b_hh, None, input.shape[-1])
    unbatched = input.dim() == 1
    want = (H,) if unbatched else (input.shape[0], H)
    _check_state(h, "hx[0] (h)", want, input)
    _check_state(c, "hx[1] (c)", want, input)
    if unbatched:
        input, h, c = input.unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0)
    name = _select("lstm_cell", "lstm_cell_fwd", backend, input)
    if name == "reference":
        hy, cy = lstm_cell_reference(input, h, c, w_ih, w_hh, b_ih, b_hh)
    elif name == "triton":
        hy, cy = _triton().lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        hy, cy, _ = _cell_op(input, h, c, w_ih, w_hh, b_ih, b_hh)
    if unbatched:
        hy, cy = hy.squeeze(0), cy.squeeze(0)
    return hy, cy


def _lengths_tensor(lengths, T: int, B: int) -> Optional[Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.shape != (B,):
        raise ValueError(f"lengths must be {B} integers (one per batch row), got {lengths.dtype} {tuple(lengths.shape)}")
    lengths = lengths.to(device="cpu", dtype=torch.int64)
    if B > 0 and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [1, seq_len={T}], got {lengths.tolist()}")
    if bool((lengths == T).all()):
        return None  # every row runs every step: the plain (faster) path
    return lengths


def _no_grad_needed(*tensors) -> bool:
    """Whether autograd will record nothing for these arguments (then the layer keeps no workspace)."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def lstm(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
         b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, w_hr: Optional[Tensor] = None, *,
         reverse: bool = False, lengths: Union[Tensor, Sequence[int], None] = None,
         backend: Optional[str] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One LSTM layer in one direction over a whole sequence, all steps in one native call.

    ``input (T, B, I)``; ``hx = (h0 (B, P), c0 (B, H))`` or None for zeros; ``w_ih (4H, I)``,
    ``w_hh (4H, P)``, ``w_hr (P, H)`` (``proj_size``; None: ``P = H``). ``reverse=True`` runs from the
    last step to the first. ``lengths`` (B,): row b runs steps ``t < lengths[b]`` only (state frozen
    after, output 0 there; in reverse each row starts at its own last step), as for a PackedSequence.
    Returns ``(output (T, B, P), (h_n, c_n))``.
    """
    if (backend is None and lengths is None and hx is not None and _layer_op_raw is not None
            and _backend._default == "auto" and isinstance(input, Tensor) and input.device.type == "cpu"):
        # Thin path (what the auto choice gives on the CPU): the native kernel checks every argument
        # itself; if it refuses, the full path below gives the clear Python error.
        try:
            h0, c0 = hx
            if _layer_infer_raw is not None and _no_grad_needed(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
                out, h_n, c_n = _layer_infer_raw(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, bool(reverse), None)
            else:
                out, h_n, c_n, *_ = _layer_op_raw(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, bool(reverse), None)
            return out, (h_n, c_n)
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, IndexError):
            pass
    _check_tensor(input, "input", (3,))
    T, B, I = input.shape
    if T == 0:
        raise ValueError("input must have at least one time step")
    H, P = _check_weights(input, w_ih, w_hh, b_ih, b_hh, w_hr, I)
    if hx is None:
        h0 = input.new_zeros((B, P))
        c0 = input.new_zeros((B, H))
    else:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("hx must be a tuple (h0, c0) or None")
        h0, c0 = hx
        _check_state(h0, "hx[0] (h0)", (B, P), input)
        _check_state(c0, "hx[1] (c0)", (B, H), input)
    lengths = _lengths_tensor(lengths, T, B)
    name = _select("lstm", "lstm_layer_fwd", backend, input)
    if name == "reference":
        out, h_n, c_n = lstm_layer_reference(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths)
    elif name == "triton":
        out, h_n, c_n = _triton().lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths)
    elif (input.device.type == "cpu" and _layer_infer_raw is not None
          and _no_grad_needed(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)):
        out, h_n, c_n = _layer_infer_raw(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, bool(reverse), lengths)
    else:
        out, h_n, c_n, *_ = _layer_op(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, bool(reverse), lengths)
    return out, (h_n, c_n)


# --------------------------------------------------------------------------------------------
# Both directions of a bidirectional layer in one native call (the CPU kernel), each direction on
# its own thread. FASTATTN_LSTM_BIDIR=sequential: the two one-direction calls of ``lstm`` (the path
# before this op); =concurrent: this op, its directions side by side even where ``auto`` would not;
# unset / auto: this op when torch has at least 2 threads and the batch is at most 64.
# Measured on 2 cores (AVX-512, 1 MB L2 each), LSTM(256, 256) bidirectional, T 100, fp32: batch 1
# 1.6x faster forward, batch 32 2-8% forward and 5-11% forward+backward; batch 128 forward 11%
# SLOWER (each core then streams its direction's 2 MB of packed weights per step, where the split
# step shares them), forward+backward even. The per-step barrier of the one-direction path is what
# the concurrent path saves, and it weighs most at small batches (and on an oversubscribed machine).
# --------------------------------------------------------------------------------------------
_BIDIR_MAX_AUTO_BATCH = 64


def bidir_mode(batch: int = 1) -> str:
    """'concurrent' or 'sequential': how a bidirectional CPU layer of this batch size runs its two
    directions now (FASTATTN_LSTM_BIDIR, see above)."""
    import os

    mode = os.environ.get("FASTATTN_LSTM_BIDIR", "auto").lower()
    if mode not in ("auto", "concurrent", "sequential"):
        raise ValueError(f"FASTATTN_LSTM_BIDIR must be auto, concurrent or sequential, got {mode!r}")
    if mode == "auto":
        mode = "concurrent" if torch.get_num_threads() >= 2 and batch <= _BIDIR_MAX_AUTO_BATCH else "sequential"
    return mode


def lstm_bidir(input: Tensor, hx: Tuple[Tensor, Tensor], hx_reverse: Tuple[Tensor, Tensor], weights: Sequence,
               weights_reverse: Sequence, *, lengths: Optional[Tensor] = None, concurrent: bool = True
               ) -> Tuple[Tensor, Tuple[Tensor, Tensor], Tensor, Tuple[Tensor, Tensor]]:
    """Both directions of one bidirectional layer on the CPU kernel: ``lstm(..., reverse=False)`` and
    ``lstm(..., reverse=True)`` bit for bit, the two time loops on two threads when ``concurrent``
    (and torch has >= 2 threads). ``weights`` = ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` of one direction;
    ``lengths`` as for :func:`lstm` (already checked: int64 CPU, or None).
    Returns ``(output, (h_n, c_n), output_reverse, (h_n_reverse, c_n_reverse))``."""
    if not isinstance(input, Tensor) or input.device.type != "cpu":
        raise ValueError("lstm_bidir: input must be a CPU Tensor (the concurrent path is the CPU kernel's)")
    args = (input, hx[0], hx[1], hx_reverse[0], hx_reverse[1], *weights, *weights_reverse, lengths, bool(concurrent))
    if _no_grad_needed(input, *hx, *hx_reverse, *weights, *weights_reverse):
        o, h, c, o_r, h_r, c_r = torch.ops.fastattn.lstm_bidir_layer_infer(*args)
    else:
        o, h, c, o_r, h_r, c_r, *_ = torch.ops.fastattn.lstm_bidir_layer_fwd(*args)
    return o, (h, c), o_r, (h_r, c_r)
