"""Drop-in Transformer layers: torch's classes, with fastattn's :class:`MultiheadAttention` inside.

Constructor and forward signatures, submodule names (so ``state_dict`` keys) and initialisation
are torch's (``torch.nn.Transformer*``); the Linear, LayerNorm, Dropout and activation submodules are
torch's own classes. The attention runs in ``fastattn.attention``, the feed-forward block's GEMMs in
``fastattn.linear`` (ReLU/GELU in linear1's epilogue). Not carried over: torch's
inference fast paths (``torch._transformer_encoder_layer_fwd`` and the NestedTensor conversion
of ``TransformerEncoder``); ``enable_nested_tensor`` is accepted and ignored. One visible effect:
in eval mode with a ``src_key_padding_mask``, torch's encoder returns ``norm(0)`` at padded
positions, ours returns the ordinary layer output there (non-padded positions agree).

Every class takes a keyword-only ``backend=`` (passed to each attention) and has
``from_torch(module)``, which builds ours around the torch module's own parameters.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Dropout, LayerNorm, Linear, Module, ModuleList
from torch.nn.init import xavier_uniform_

from fastattn.nn.attention import MultiheadAttention, _canonical_mask
from fastattn.nn.linear import dense
from fastattn.ops._activation import ACTIVATIONS, apply_activation

__all__ = ["Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
           "TransformerDecoderLayer"]


def _generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
    """Float (sz, sz) mask: -inf above the diagonal, 0 elsewhere (torch's causal mask)."""
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)


def _get_activation_fn(activation: str) -> Callable[[Tensor], Tensor]:
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise RuntimeError(f"activation should be relu/gelu, not {activation}")


def _fusable(activation: Callable[[Tensor], Tensor]) -> Optional[str]:
    """'relu' / 'gelu' when ``activation`` is one that fastattn.linear applies in its epilogue."""
    if activation is F.relu or type(activation) is torch.nn.ReLU:
        return "relu"
    if activation is F.gelu or (type(activation) is torch.nn.GELU and activation.approximate == "none"):
        return "gelu"
    return None


def _apply_linear(m: Module, x: Tensor, activation: Optional[str], backend: Optional[str]) -> Tensor:
    """``activation(m(x))``: a plain ``torch.nn.Linear`` (what the constructors and ``from_torch`` put here)
    runs as ``fastattn.linear`` with the activation in its epilogue; any other module is called as it is."""
    if type(m) is Linear:
        return dense(x, m.weight, m.bias, activation, backend)
    return apply_activation(m(x), ACTIVATIONS[activation])


def _feed_forward(layer: Module, x: Tensor) -> Tensor:
    """``linear2(dropout(activation(linear1(x))))`` on fastattn's GEMMs (the layer's backend), ReLU or
    GELU fused into linear1's epilogue; any other activation runs as given between the two."""
    backend = layer.self_attn.backend
    act = _fusable(layer.activation)
    h = _apply_linear(layer.linear1, x, act, backend)
    if act is None:
        h = layer.activation(h)
    return _apply_linear(layer.linear2, layer.dropout(h), None, backend)


def _get_seq_len(src: Tensor, batch_first: bool) -> int:
    if src.dim() == 2:
        return src.shape[0]
    return src.shape[1 if batch_first else 0]


def _detect_is_causal_mask(mask: Optional[Tensor], is_causal: Optional[bool] = None,
                           size: Optional[int] = None) -> bool:
    """torch's rule: a given hint wins; with ``None``, the mask is causal iff it equals the square one."""
    make_causal = is_causal is True
    if is_causal is None and mask is not None:
        sz = size if size is not None else mask.size(-2)
        causal = _generate_square_subsequent_mask(sz, device=mask.device, dtype=mask.dtype)
        make_causal = mask.size() == causal.size() and bool((mask == causal).all())
    return make_causal


def _get_clones(module: Module, n: int) -> ModuleList:
    return ModuleList([copy.deepcopy(module) for _ in range(n)])


# --------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------
class TransformerEncoderLayer(Module):
    """Drop-in for :class:`torch.nn.TransformerEncoderLayer` (self-attention + feed-forward)."""

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, backend: Optional[str] = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            backend=backend, **factory_kwargs)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        if isinstance(activation, str):
            activation = _get_activation_fn(activation)
        # torch stashes this for its fast path; kept so code that reads it still works.
        if activation is F.relu or isinstance(activation, torch.nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, torch.nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self.activation = activation

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "activation"):
            self.activation = F.relu

    @classmethod
    def from_torch(cls, layer: torch.nn.TransformerEncoderLayer, *, backend: Optional[str] = None):
        """Ours around ``layer``'s own submodules and parameters (nothing is copied)."""
        if not isinstance(layer, torch.nn.TransformerEncoderLayer):
            raise TypeError(f"expected a torch.nn.TransformerEncoderLayer, got {type(layer).__name__}")
        new = cls(layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features,
                  layer.dropout.p, layer.activation, layer.norm1.eps, layer.self_attn.batch_first, layer.norm_first,
                  layer.linear1.bias is not None, device="meta", backend=backend)
        for name, child in layer.named_children():
            setattr(new, name, MultiheadAttention.from_torch(child, backend=backend) if name == "self_attn" else child)
        new.train(layer.training)
        return new

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        src_key_padding_mask = _canonical_mask(src_key_padding_mask, "src_key_padding_mask", src.dtype,
                                               src_mask, "src_mask")
        src_mask = _canonical_mask(src_mask, "src_mask", src.dtype)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(_feed_forward(self, x))


class TransformerDecoderLayer(Module):
    """Drop-in for :class:`torch.nn.TransformerDecoderLayer` (self-attention, cross-attention, feed-forward)."""

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, backend: Optional[str] = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first, bias=bias,
                                            backend=backend, **factory_kwargs)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first, bias=bias,
                                                 backend=backend, **factory_kwargs)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = _get_activation_fn(activation) if isinstance(activation, str) else activation

    def __setstate__(self, state):
        state.setdefault("activation", F.relu)
        super().__setstate__(state)

    @classmethod
    def from_torch(cls, layer: torch.nn.TransformerDecoderLayer, *, backend: Optional[str] = None):
        """Ours around ``layer``'s own submodules and parameters (nothing is copied)."""
        if not isinstance(layer, torch.nn.TransformerDecoderLayer):
            raise TypeError(f"expected a torch.nn.TransformerDecoderLayer, got {type(layer).__name__}")
        new = cls(layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features,
                  layer.dropout.p, layer.activation, layer.norm1.eps, layer.self_attn.batch_first, layer.norm_first,
                  layer.linear1.bias is not None, device="meta", backend=backend)
        for name, child in layer.named_children():
            if name in ("self_attn", "multihead_attn"):
                child = MultiheadAttention.from_torch(child, backend=backend)
            setattr(new, name, child)
        new.train(layer.training)
        return new

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           is_causal=is_causal, need_weights=False)[0]
        return self.dropout1(x)

    def _mha_block(self, x: Tensor, mem: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                   is_causal: bool = False) -> Tensor:
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(_feed_forward(self, x))


# --------------------------------------------------------------------------------------------
# Stacks.
# --------------------------------------------------------------------------------------------
def _convert_layers(layers: ModuleList, layer_cls, torch_cls, backend):
    """Each torch layer becomes ours (sharing its parameters); other (custom) layers are kept as they are."""
    return ModuleList([layer_cls.from_torch(m, backend=backend) if isinstance(m, torch_cls) else m for m in layers])


class TransformerEncoder(Module):
    """Drop-in for :class:`torch.nn.TransformerEncoder`: ``num_layers`` copies of ``encoder_layer``, then ``norm``.

    ``enable_nested_tensor`` and ``mask_check`` are accepted for compatibility; there is no
    NestedTensor path (padded positions are computed like any other).
    """

    def __init__(self, encoder_layer: Module, num_layers: int, norm: Optional[Module] = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False
        self.mask_check = mask_check

    @classmethod
    def from_torch(cls, encoder: torch.nn.TransformerEncoder, *, backend: Optional[str] = None):
        """Ours around ``encoder``'s own layers' parameters and its ``norm`` (nothing is copied)."""
        if not isinstance(encoder, torch.nn.TransformerEncoder):
            raise TypeError(f"expected a torch.nn.TransformerEncoder, got {type(encoder).__name__}")
        new = cls.__new__(cls)
        Module.__init__(new)
        new.layers = _convert_layers(encoder.layers, TransformerEncoderLayer, torch.nn.TransformerEncoderLayer, backend)
        new.num_layers = encoder.num_layers
        new.norm = encoder.norm
        new.enable_nested_tensor = getattr(encoder, "enable_nested_tensor", True)
        new.use_nested_tensor = False
        new.mask_check = getattr(encoder, "mask_check", True)
        new.train(encoder.training)
        return new

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        mask = _canonical_mask(mask, "mask", src.dtype)
        first = self.layers[0]
        batch_first = first.self_attn.batch_first if hasattr(first, "self_attn") else False
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, batch_first))
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(Module):
    """Drop-in for :class:`torch.nn.TransformerDecoder`: ``num_layers`` copies of ``decoder_layer``, then ``norm``."""

    def __init__(self, decoder_layer: Module, num_layers: int, norm: Optional[Module] = None) -> None:
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    @classmethod
    def from_torch(cls, decoder: torch.nn.TransformerDecoder, *, backend: Optional[str] = None):
        """Ours around ``decoder``'s own layers' parameters and its ``norm`` (nothing is copied)."""
        if not isinstance(decoder, torch.nn.TransformerDecoder):
            raise TypeError(f"expected a torch.nn.TransformerDecoder, got {type(decoder).__name__}")
        new = cls.__new__(cls)
        Module.__init__(new)
        new.layers = _convert_layers(decoder.layers, TransformerDecoderLayer, torch.nn.TransformerDecoderLayer, backend)
        new.num_layers = decoder.num_layers
        new.norm = decoder.norm
        new.train(decoder.training)
        return new

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        first = self.layers[0]
        batch_first = first.self_attn.batch_first if hasattr(first, "self_attn") else False
        tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, _get_seq_len(tgt, batch_first))
        output = tgt
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(Module):
    """Drop-in for :class:`torch.nn.Transformer` (encoder-decoder), same arguments and ``state_dict`` keys."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, custom_encoder: Optional[Any] = None,
                 custom_decoder: Optional[Any] = None, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, backend: Optional[str] = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias,
                                                    backend=backend, **factory_kwargs)
            encoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias,
                                                    backend=backend, **factory_kwargs)
            decoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, decoder_norm)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    @classmethod
    def from_torch(cls, model: torch.nn.Transformer, *, backend: Optional[str] = None):
        """Ours around ``model``'s own parameters (nothing is copied); custom encoders/decoders are kept."""
        if not isinstance(model, torch.nn.Transformer):
            raise TypeError(f"expected a torch.nn.Transformer, got {type(model).__name__}")
        new = cls.__new__(cls)
        Module.__init__(new)
        enc, dec = model.encoder, model.decoder
        new.encoder = TransformerEncoder.from_torch(enc, backend=backend) if isinstance(
            enc, torch.nn.TransformerEncoder) else enc
        new.decoder = TransformerDecoder.from_torch(dec, backend=backend) if isinstance(
            dec, torch.nn.TransformerDecoder) else dec
        new.d_model, new.nhead, new.batch_first = model.d_model, model.nhead, model.batch_first
        new.train(model.training)
        return new

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None, memory_key_padding_mask: Optional[Tensor] = None,
                src_is_causal: Optional[bool] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        is_batched = src.dim() == 3
        if is_batched and src.size(0 if self.batch_first else 1) != tgt.size(0 if self.batch_first else 1):
            raise RuntimeError("the batch number of src and tgt must be equal")
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise RuntimeError("the feature number of src and tgt must be equal to d_model")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        """Float (sz, sz) causal mask: ``-inf`` above the diagonal, 0 on and below it."""
        return _generate_square_subsequent_mask(sz, device=device, dtype=dtype)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                xavier_uniform_(p)
