"""Transformer models: an encoder-decoder (``Seq2SeqTransformer``) and a decoder-only LM (``TransformerLM``).

Both take ``impl="fastattn" | "torch"``: the attention layers come from ``fastattn.nn`` or
``torch.nn`` (same parameter names), everything else (embeddings, LayerNorm, MLP) is plain torch.

The LM's blocks are pre-norm: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``. Training runs each
block's ``MultiheadAttention`` on the whole causal sequence; decoding keeps a KV cache and runs
the block by hand with the same weights (``in_proj_weight``, ``out_proj``): the L new rows
(1..16 at a time) attend to the S cached keys with bottom-right causal alignment, through
``fastattn.attention(q, k, v, causal=True, causal_align="bottom_right")`` for impl=fastattn.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models._impl import modules


def causal_mask(n: int, device=None) -> Tensor:
    """Bool (n, n), True above the diagonal: the positions torch's attention masks out."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


# --------------------------------------------------------------------------------------------
# Encoder-decoder
# --------------------------------------------------------------------------------------------
class Seq2SeqTransformer(nn.Module):
    """Token embeddings + learned positions → ``Transformer`` (pre-norm, batch_first) → vocabulary."""

    def __init__(self, vocab_size: int, d_model: int = 64, nhead: int = 4, num_encoder_layers: int = 2,
                 num_decoder_layers: int = 2, dim_feedforward: int = 256, dropout: float = 0.0,
                 max_len: int = 64, pad_id: int = 0, impl: str = "fastattn", backend: Optional[str] = None):
        super().__init__()
        M = modules(impl, backend)
        self.pad_id, self.max_len = pad_id, max_len
        self.src_embed = nn.Embedding(vocab_size, d_model)
        self.tgt_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_len, d_model)
        self.transformer = M.Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                         dropout, batch_first=True, norm_first=True)
        self.generator = M.Linear(d_model, vocab_size)

    def _embed(self, table: nn.Embedding, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of length {tokens.shape[1]} is longer than max_len={self.max_len}")
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return table(tokens) + self.pos_embed(pos)

    def encode(self, src: Tensor, src_pad: Optional[Tensor] = None) -> Tensor:
        """src (B, S) ids -> memory (B, S, d); ``src_pad`` = ``src == pad_id`` if the caller has it already."""
        src_pad = src == self.pad_id if src_pad is None else src_pad
        return self.transformer.encoder(self._embed(self.src_embed, src), src_key_padding_mask=src_pad)

    def decode(self, tgt_in: Tensor, memory: Tensor, src: Tensor, src_pad: Optional[Tensor] = None) -> Tensor:
        T = tgt_in.shape[1]
        src_pad = src == self.pad_id if src_pad is None else src_pad
        h = self.transformer.decoder(self._embed(self.tgt_embed, tgt_in), memory,
                                     tgt_mask=causal_mask(T, tgt_in.device), tgt_is_causal=True,
                                     memory_key_padding_mask=src_pad)
        return self.generator(h)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) token ids (pad = ``pad_id``) → logits (B, T, vocab)."""
        # One padding mask object for every attention layer: fastattn's modules turn it into an
        # additive bias once and reuse it (see fastattn.nn.attention._bool_to_bias).
        src_pad = src == self.pad_id
        return self.decode(tgt_in, self.encode(src, src_pad), src, src_pad)

    @torch.no_grad()
    def greedy(self, src: Tensor, max_new_tokens: int, bos_id: int, eos_id: int) -> Tensor:
        """Greedy decoding: (B, ≤ max_new_tokens) ids after BOS; positions after EOS hold ``pad_id``."""
        src_pad = src == self.pad_id
        memory = self.encode(src, src_pad)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(min(max_new_tokens, self.max_len - 1)):
            nxt = self.decode(out, memory, src, src_pad)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return out[:, 1:]


# --------------------------------------------------------------------------------------------
# Decoder-only LM with a KV cache
# --------------------------------------------------------------------------------------------
class KVCache:
    """Per-layer key/value buffers (B, H, capacity, head_dim) and how many positions are filled."""

    def __init__(self, n_layers: int, batch: int, heads: int, capacity: int, head_dim: int, device, dtype):
        shape = (batch, heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.capacity = capacity
        self.length = 0


def feed_forward(M, d_model: int, dim_feedforward: int, dropout: float) -> nn.Sequential:
    """Linear → GELU → Linear → Dropout, its weights ``mlp.0.*`` / ``mlp.2.*`` with either impl; with
    impl="fastattn" the GELU runs in the first Linear's epilogue (then ``mlp.1`` is an Identity)."""
    if M.impl == "fastattn":
        return nn.Sequential(M.Linear(d_model, dim_feedforward, activation="gelu"), nn.Identity(),
                             M.Linear(dim_feedforward, d_model), nn.Dropout(dropout))
    return nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model),
                         nn.Dropout(dropout))


class Block(nn.Module):
    def __init__(self, M, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = M.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = feed_forward(M, d_model, dim_feedforward, dropout)
        self.nhead = nhead

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=causal_mask(x.shape[1], x.device), need_weights=False, is_causal=True)
        x = x + a
        return x + self.mlp(self.ln2(x))

    def step(self, x: Tensor, cache: KVCache, layer: int, attend) -> Tensor:
        """x (B, L, d): the L newest positions; appends their keys/values to the cache, attends to all."""
        B, L, d = x.shape
        H, Dh = self.nhead, d // self.nhead
        h = self.ln1(x)
        q, k, v = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias).split(d, dim=-1)
        q, k, v = (t.view(B, L, H, Dh).transpose(1, 2) for t in (q, k, v))
        start, end = cache.length, cache.length + L
        cache.k[layer][:, :, start:end] = k
        cache.v[layer][:, :, start:end] = v
        o = attend(q, cache.k[layer][:, :, :end], cache.v[layer][:, :, :end])
        x = x + self.attn.out_proj(o.transpose(1, 2).reshape(B, L, d))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Decoder-only, causal, pre-norm language model over a ``block_size`` context."""

    def __init__(self, vocab_size: int, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 512, block_size: int = 64, dropout: float = 0.0, impl: str = "fastattn",
                 backend: Optional[str] = None):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        M = modules(impl, backend)
        self.block_size, self.nhead, self.backend = block_size, nhead, backend
        self._attend_fn = M.attention
        self.tok_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(M, d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = M.Linear(d_model, vocab_size)

    def _embed(self, idx: Tensor, start: int = 0) -> Tensor:
        if start + idx.shape[1] > self.block_size:
            raise ValueError(f"positions {start}..{start + idx.shape[1] - 1} exceed block_size={self.block_size}")
        return self.tok_embed(idx) + self.pos_embed(torch.arange(start, start + idx.shape[1], device=idx.device))

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B, T ≤ block_size) → logits (B, T, vocab), each position seeing itself and the past."""
        x = self._embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._attend_fn(q, k, v, backend=self.backend)

    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        p = self.tok_embed.weight
        d = p.shape[1]
        return KVCache(len(self.blocks), batch, self.nhead, self.block_size, d // self.nhead,
                       device or p.device, dtype or p.dtype)

    def forward_cached(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Run the newest tokens idx (B, L) against the cache; returns their logits (B, L, vocab)."""
        x = self._embed(idx, cache.length)
        for i, blk in enumerate(self.blocks):
            x = blk.step(x, cache, i, self._attend)
        cache.length += idx.shape[1]
        return self.head(self.ln_f(x))

    def _prefill(self, idx: Tensor, chunk: int) -> (Tensor, KVCache):
        cache = self.new_cache(idx.shape[0])
        logits = None
        for s in range(0, idx.shape[1], chunk):
            logits = self.forward_cached(idx[:, s:s + chunk], cache)
        return logits[:, -1], cache

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, prefill_chunk: int = 16) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T ≥ 1); temperature 0 = greedy.

        The prompt is fed in chunks of ``prefill_chunk`` (≤ 16) rows, then one token a step; when
        the context fills, the cache is rebuilt from the last ``block_size // 2`` tokens.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be (batch, T>=1) token ids, got shape {tuple(idx.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if not 1 <= prefill_chunk <= 16:
            raise ValueError(f"prefill_chunk must be in 1..16, got {prefill_chunk}")
        keep = self.block_size // 2
        logits, cache = self._prefill(idx[:, -self.block_size:], prefill_chunk)
        out: List[Tensor] = [idx]
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, generator)
            out.append(nxt)
            if cache.length == self.block_size:
                context = torch.cat(out, dim=1)[:, -keep:]
                logits, cache = self._prefill(context, prefill_chunk)
            else:
                logits = self.forward_cached(nxt, cache)[:, -1]
        return torch.cat(out, dim=1)


def sample(logits: Tensor, temperature: float, top_k: Optional[int], generator=None) -> Tensor:
    """Next token ids (B, 1) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
