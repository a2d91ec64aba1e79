"""Drop-in ``LSTM`` and ``LSTMCell`` running fastattn's kernels.

They subclass torch's modules, so constructors, parameter names (``weight_ih_l0``,
``weight_hh_l0_reverse``, ``bias_ih_l0``, ``weight_hr_l0``, ...), initialisation, ``state_dict``
keys and ``repr`` are torch's, and ``isinstance(m, torch.nn.LSTM)`` holds; only ``forward`` is
ours: each layer and direction is one call of :func:`fastattn.ops.lstm.lstm` (all time steps in one
native kernel call).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fastattn import backend as _backend
from fastattn.ops import lstm as _ops

__all__ = ["LSTM", "LSTMCell"]

_lstm_cell = _ops.lstm_cell


class LSTMCell(torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` with fastattn's fused cell kernel; ``backend=`` picks the kernel."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        # Thin path (batched input, given state, automatic backend): straight to the native op, whose
        # own checks (TORCH_CHECK) guard it; parameters read from the dict (nn.Module.__getattr__ costs
        # ~0.3 us each, a tenth of a step at hidden 50). If the op refuses, the full path below gives
        # the clear error or picks another backend.
        if hx is not None and self.backend is None and _ops._cell_op_raw is not None and _backend._default == "auto":
            try:
                if input.dim() == 2:
                    p = self._parameters
                    hy, cy, _ = _ops._cell_op_raw(input, hx[0], hx[1], p["weight_ih"], p["weight_hh"],
                                                  p.get("bias_ih"), p.get("bias_hh"))
                    return hy, cy
            except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, IndexError, KeyError):
                pass
        if hx is None:
            shape = (self.hidden_size,) if input.dim() == 1 else (input.shape[0], self.hidden_size)
            z = input.new_zeros(shape)
            hx = (z, z)
        return _lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                              backend=self.backend)


def _pack_index(batch_sizes: Tensor, device) -> Tuple[Tensor, Tensor, int, int]:
    """For packed data: rows of the padded (T*B) layout that hold data, and each sequence's length.

    Packed data lists step 0 of every sequence, then step 1 of those still running, ...; sequences
    are sorted by decreasing length, so at step t the first ``batch_sizes[t]`` batch rows run, and
    the padded rows that hold data, in row-major (t, b) order, are exactly the packed order.
    """
    T, B = batch_sizes.numel(), int(batch_sizes[0])
    mask = torch.arange(B).view(1, B) < batch_sizes.view(T, 1)
    lengths = mask.sum(0)
    rows = mask.view(-1).nonzero().squeeze(1).to(device)
    return rows, lengths, T, B


class LSTM(torch.nn.LSTM):
    """``torch.nn.LSTM`` with fastattn's whole-layer kernels; ``backend=`` picks the kernel.

    Takes what torch's does: ``(input, (h_0, c_0))`` or ``(input, None)``, batched or unbatched,
    ``batch_first``, or a ``PackedSequence`` (sorted or not); returns ``(output, (h_n, c_n))``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)
        self.backend = backend

    def _weights(self, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda n: getattr(self, n + sfx) if hasattr(self, n + sfx) else None  # noqa: E731
        return (getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx), get("bias_ih"), get("bias_hh"),
                get("weight_hr") if self.proj_size > 0 else None)

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            rows, lengths, T, B = _pack_index(batch_sizes, data.device)
            x = data.new_zeros((T * B, data.shape[-1])).index_copy(0, rows, data).view(T, B, -1)
            if bool((lengths == T).all()):
                lengths = None
            unbatched = False
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: expected input to be 2-D (unbatched) or 3-D, got {input.dim()}-D "
                                 f"shape {tuple(input.shape)}")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            sorted_indices = unsorted_indices = None
            T, B = x.shape[0], x.shape[1]
        if x.shape[-1] != self.input_size:
            raise ValueError(f"LSTM: input has {x.shape[-1]} features, expected input_size={self.input_size}")

        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H
        if hx is None:
            h0 = c0 = None  # zeros, made per layer and direction below (no select per call)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
            h0, c0 = hx
            for name, t, size in (("h_0", h0, P), ("c_0", c0, H)):
                if not isinstance(t, Tensor):
                    raise TypeError(f"LSTM: {name} must be a Tensor, got {type(t).__name__}")
                want = (self.num_layers * D, size) if unbatched else (self.num_layers * D, B, size)
                if tuple(t.shape) != want:
                    raise ValueError(f"LSTM: expected {name} of shape {want}, got {tuple(t.shape)}")
                if t.dtype != x.dtype or t.device != x.device:
                    raise TypeError(f"LSTM: {name} must have the input's dtype and device ({x.dtype}, {x.device}), "
                                    f"got ({t.dtype}, {t.device})")
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            elif sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)

        # Bidirectional on the CPU kernel: both directions of a layer in one call, side by side on
        # two threads (FASTATTN_LSTM_BIDIR, see fastattn.ops.lstm.bidir_mode).
        bidir = (D == 2 and x.device.type == "cpu" and _ops._layer_op is not None
                 and hasattr(torch.ops.fastattn, "lstm_bidir_layer_fwd")
                 and _ops._select("lstm", "lstm_layer_fwd", self.backend, x) == "cpu"
                 and _ops.bidir_mode(B) == "concurrent")
        if bidir and lengths is not None:
            lengths = lengths.to(dtype=torch.int64)
        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            if bidir:
                k = layer * D
                zero = lambda: (x.new_zeros((B, P)), x.new_zeros((B, H)))  # noqa: E731
                states = [zero(), zero()] if h0 is None else [(h0[k], c0[k]), (h0[k + 1], c0[k + 1])]
                out, (h, c), out_r, (h_r, c_r) = _ops.lstm_bidir(layer_input, states[0], states[1],
                                                                 self._weights(layer, 0), self._weights(layer, 1),
                                                                 lengths=lengths)
                outs, h_n, c_n = [out, out_r], h_n + [h, h_r], c_n + [c, c_r]
            for d in range(0 if bidir else D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, d)
                state = (x.new_zeros((B, P)), x.new_zeros((B, H))) if h0 is None else (h0[k], c0[k])
                out, (h, c) = _ops.lstm(layer_input, state, w_ih, w_hh, b_ih, b_hh, w_hr, reverse=d == 1,
                                        lengths=lengths, backend=self.backend)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        output = layer_input
        if len(h_n) == 1:  # one layer, one direction: a view, not a copy
            h_n, c_n = h_n[0].unsqueeze(0), c_n[0].unsqueeze(0)
        else:
            h_n, c_n = torch.stack(h_n), torch.stack(c_n)

        if packed:
            out_data = output.reshape(T * B, -1).index_select(0, rows)
            output = PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        elif unbatched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)
