"""Character-level text for the LM: Python's own ``pydoc_data`` topics (≈465k chars, no download) or a text file.

The text is cut into non-overlapping windows of ``block_size + 1`` characters (input = the first
``block_size``, target = the same shifted by one); a seeded permutation of the windows makes the
train / val / test split (90/5/5 %).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import torch
from torch.utils.data import Dataset


def pydoc_corpus() -> str:
    """The text of Python's ``help()`` topics, in a fixed order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if len(text) < 100:
        raise ValueError(f"text file {path!r} has {len(text)} characters: too little to train on")
    return text


class CharVocab:
    def __init__(self, chars: List[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        unknown = sorted(set(c for c in s if c not in self.index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return torch.tensor([self.index[c] for c in s], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class CharWindows(Dataset):
    """Windows ``starts[i] .. starts[i] + block_size`` of ``ids``: (input, target) pairs."""

    def __init__(self, ids: torch.Tensor, starts: torch.Tensor, block_size: int):
        self.ids, self.starts, self.block_size = ids, starts, block_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        w = self.ids[s:s + self.block_size + 1]
        return w[:-1], w[1:]


def char_lm(block_size: int = 64, seed: int = 0, text: Optional[str] = None) -> Dict[str, object]:
    """{"train", "val", "test": CharWindows, "vocab": CharVocab, "unigram": baseline nats/char on val}."""
    text = pydoc_corpus() if text is None else text
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text)
    n_windows = (len(ids) - 1) // (block_size + 1)
    if n_windows < 20:
        raise ValueError(f"{len(ids)} characters give only {n_windows} windows of {block_size + 1}: need >= 20")
    starts = torch.arange(n_windows) * (block_size + 1)
    perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    n_val = n_test = max(1, n_windows // 20)
    parts = {"train": perm[:n_windows - n_val - n_test], "val": perm[n_windows - n_val - n_test:n_windows - n_test],
             "test": perm[n_windows - n_test:]}
    out = {name: CharWindows(ids, starts[p].sort().values, block_size) for name, p in parts.items()}
    out["vocab"] = vocab
    out["unigram"] = unigram_baseline(out["train"], out["val"], len(vocab))
    return out


def _targets(ds: CharWindows) -> torch.Tensor:
    return torch.cat([ds[i][1] for i in range(len(ds))])


def unigram_baseline(train: CharWindows, val: CharWindows, vocab_size: int) -> float:
    """Cross-entropy (nats/char) on val of the train character frequencies (add-one smoothed)."""
    counts = torch.bincount(_targets(train), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    loss = -logp[_targets(val)].mean().item()
    assert math.isfinite(loss)
    return loss
