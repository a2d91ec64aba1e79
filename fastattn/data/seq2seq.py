"""Synthetic sequence-to-sequence tasks over digit tokens: copy, reverse, sort, addition.

Tokens: 0 PAD, 1 BOS, 2 EOS, 3..12 the digits 0..9, 13 ``+``. A sample is ``(src, tgt)``, both
padded int64: ``src`` the digits (``a+b`` for addition), ``tgt = BOS target EOS PAD...``.
Lengths are drawn from ``min_len..max_len``; the splits are disjoint draws of one seeded generator.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.utils.data import Dataset

PAD, BOS, EOS, PLUS = 0, 1, 2, 13
VOCAB_SIZE = 14
TASKS = ("copy", "reverse", "sort", "addition")


def digit_tokens(digits: List[int]) -> List[int]:
    return [3 + d for d in digits]


def detokenize(ids) -> str:
    out = []
    for t in ids:
        t = int(t)
        if t == EOS:
            break
        out.append("+" if t == PLUS else str(t - 3) if 3 <= t <= 12 else {PAD: "_", BOS: "^"}.get(t, "?"))
    return "".join(out)


def tokenize(s: str) -> List[int]:
    """'3+45' → tokens; spaces ignored."""
    ids = []
    for c in s.replace(" ", ""):
        if c == "+":
            ids.append(PLUS)
        elif c.isdigit():
            ids.append(3 + int(c))
        else:
            raise ValueError(f"seq2seq prompts take digits and '+', got {c!r}")
    return ids


def make_pair(task: str, g: torch.Generator, min_len: int, max_len: int):
    n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
    if task == "addition":
        nd = max(1, n // 2)
        a = int(torch.randint(0, 10 ** nd, (1,), generator=g))
        b = int(torch.randint(0, 10 ** nd, (1,), generator=g))
        return tokenize(f"{a}+{b}"), tokenize(str(a + b))
    digits = torch.randint(0, 10, (n,), generator=g).tolist()
    target = {"copy": digits, "reverse": digits[::-1], "sort": sorted(digits)}[task]
    return digit_tokens(digits), digit_tokens(target)


class Seq2SeqTask(Dataset):
    def __init__(self, pairs, src_len: int, tgt_len: int):
        self.src = torch.full((len(pairs), src_len), PAD, dtype=torch.int64)
        self.tgt = torch.full((len(pairs), tgt_len), PAD, dtype=torch.int64)
        for i, (s, t) in enumerate(pairs):
            self.src[i, :len(s)] = torch.tensor(s)
            self.tgt[i, :len(t) + 2] = torch.tensor([BOS] + t + [EOS])
        self.vocab_size = VOCAB_SIZE

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i):
        return self.src[i], self.tgt[i]


def seq2seq(task: str = "reverse", seed: int = 0, n_train: int = 20000, n_val: int = 1000, n_test: int = 1000,
            min_len: int = 4, max_len: int = 12) -> Dict[str, Seq2SeqTask]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    g = torch.Generator().manual_seed(seed)
    pairs = [make_pair(task, g, min_len, max_len) for _ in range(n_train + n_val + n_test)]
    src_len = max(len(s) for s, _ in pairs)
    tgt_len = max(len(t) for _, t in pairs) + 2
    return {"train": Seq2SeqTask(pairs[:n_train], src_len, tgt_len),
            "val": Seq2SeqTask(pairs[n_train:n_train + n_val], src_len, tgt_len),
            "test": Seq2SeqTask(pairs[n_train + n_val:], src_len, tgt_len)}
