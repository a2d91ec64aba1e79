"""Swap a model's torch modules for fastattn's in place: ``fastattn.patch(model)`` / ``fastattn.unpatch(model)``.

    model = torch.nn.Transformer(d_model=64, nhead=4, batch_first=True)
    swapped = fastattn.patch(model)      # ['encoder.layers.0', ..., 'decoder.layers.1']
    out = model(src, tgt)                # the same outputs, fastattn's kernels
    fastattn.unpatch(model)              # the original torch modules are back (with the current weights)

What is swapped (exact type match, so subclasses and already patched modules are left alone):
``MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerDecoderLayer``, ``Conv2d``, ``LSTM``,
``LSTMCell``. The torch containers ``Transformer`` / ``TransformerEncoder`` / ``TransformerDecoder``
stay (they only loop over their layers), their layers are swapped. A swapped module's children are
not visited again (a patched encoder layer already holds fastattn's attention).

Each replacement is built with the original's constructor arguments, moved to its device and dtype,
given ``load_state_dict(original.state_dict())``, its ``training`` flag and ``requires_grad`` flags;
parameter names do not change, so checkpoints and ``state_dict`` keys stay valid. Note: an
optimizer made before ``patch`` holds the old parameter objects; make it after patching. Types
this build of fastattn does not provide are skipped (listed in one warning).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["patch", "unpatch", "constructor_kwargs"]

_ORIGINAL = "_fastattn_original"  # attribute (outside nn.Module's registries) holding the replaced module
SWAPPABLE = ("TransformerEncoderLayer", "TransformerDecoderLayer", "MultiheadAttention", "Conv2d", "LSTM", "LSTMCell")


def _activation_arg(act):
    """TransformerXLayer stores its activation as a function or a module; the constructor takes either."""
    return act


def constructor_kwargs(m: nn.Module) -> dict:
    """The constructor arguments that rebuild torch module ``m`` (one of ``SWAPPABLE``)."""
    if type(m) is nn.Conv2d:
        return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode)
    if type(m) is nn.LSTM:
        return dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                    batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional,
                    proj_size=m.proj_size)
    if type(m) is nn.LSTMCell:
        return dict(input_size=m.input_size, hidden_size=m.hidden_size, bias=m.bias)
    if type(m) is nn.MultiheadAttention:
        return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout,
                    bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
                    add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first)
    if type(m) in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        return dict(d_model=m.linear1.in_features, nhead=m.self_attn.num_heads,
                    dim_feedforward=m.linear1.out_features, dropout=m.dropout.p,
                    activation=_activation_arg(m.activation), layer_norm_eps=m.norm1.eps,
                    batch_first=m.self_attn.batch_first, norm_first=m.norm_first, bias=m.linear1.bias is not None)
    raise TypeError(f"fastattn.patch cannot rebuild a {type(m).__name__}")


def default_mapping() -> Dict[type, type]:
    """torch class → fastattn class, for the classes this build of fastattn provides."""
    import fastattn.nn
    mapping, missing = {}, []
    for name in SWAPPABLE:
        ours = getattr(fastattn.nn, name, None)
        if ours is None:
            missing.append(name)
        else:
            mapping[getattr(nn, name)] = ours
    if missing:
        warnings.warn(f"fastattn.patch: this build has no fastattn.nn.{', '.join(missing)}; those modules stay torch's",
                      stacklevel=3)
    return mapping


def _dtype_device(m: nn.Module):
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device, (t.dtype if t.is_floating_point() else None)
    return None, None


def _replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def _swap(old: nn.Module, new_cls: Callable, backend: Optional[str]) -> nn.Module:
    kwargs = constructor_kwargs(old)
    if backend is not None:
        kwargs["backend"] = backend
    device, dtype = _dtype_device(old)
    new = new_cls(**kwargs)
    new.to(device=device, dtype=dtype) if dtype is not None else new.to(device=device)
    new.load_state_dict(old.state_dict())
    new.train(old.training)
    old_params = dict(old.named_parameters())
    for n, p in new.named_parameters():
        if n in old_params:
            p.requires_grad_(old_params[n].requires_grad)
    new.__dict__[_ORIGINAL] = old
    return new


def patch(model: nn.Module, mapping: Optional[Dict[type, type]] = None, backend: Optional[str] = None) -> List[str]:
    """Swap ``model``'s torch modules for fastattn's in place; returns the swapped modules' names.

    ``mapping`` (torch class → replacement class) defaults to fastattn.nn's classes; ``backend``
    is passed to every replacement's constructor. ``model`` itself is not replaced (patch its
    parent, or use the returned modules via ``model.get_submodule``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch takes an nn.Module, got {type(model).__name__}")
    mapping = default_mapping() if mapping is None else mapping
    swapped: List[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if _ORIGINAL in child.__dict__:
                continue  # patched before: it and its children are fastattn's already
            new_cls = mapping.get(type(child))
            if new_cls is not None:
                _replace(parent, name, _swap(child, new_cls, backend))
                swapped.append(full)
            else:
                visit(child, full + ".")

    visit(model, "")
    return swapped


def unpatch(model: nn.Module) -> List[str]:
    """Put back the torch modules that :func:`patch` replaced, with the replacements' current weights."""
    restored: List[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            original = child.__dict__.get(_ORIGINAL)
            if original is not None:
                with torch.no_grad():
                    original.load_state_dict(child.state_dict())
                original.train(child.training)
                _replace(parent, name, original)
                restored.append(full)
            else:
                visit(child, full + ".")

    visit(model, "")
    return restored
