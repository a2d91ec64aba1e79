"""scikit-learn's handwritten digits (1797 8×8 images, shipped with sklearn: no download).

* ``DigitsImages``: each image upscaled ×8 (nearest) to 64×64 and repeated to 3 channels, for the seed CNN.
* ``DigitsSequences``: each image as 8 steps of 8 features (its rows), for the seed RNN.

``digits(kind, seed)`` gives fixed train/val/test splits (70/15/15 %) by a seeded permutation.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import Dataset


def load_digits_tensors():
    """(images float32 (N, 8, 8) in [0, 1], labels int64 (N,))."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError("the digits data set needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def split_indices(n: int, seed: int, val_frac: float = 0.15, test_frac: float = 0.15) -> Dict[str, torch.Tensor]:
    """A seeded permutation of range(n) cut into train / val / test."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(round(n * val_frac)), int(round(n * test_frac))
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"{n} samples are too few for a train/val/test split")
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}


class DigitsImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int = 64, channels: int = 3):
        if size % images.shape[-1]:
            raise ValueError(f"size {size} must be a multiple of the image side {images.shape[-1]}")
        self.images, self.labels = images, labels
        self.factor, self.channels = size // images.shape[-1], channels
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i].repeat_interleave(self.factor, 0).repeat_interleave(self.factor, 1)
        return img.expand(self.channels, -1, -1).clone(), self.labels[i]


class DigitsSequences(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]  # (8 steps, 8 features)


def digits(kind: str = "image", seed: int = 0, size: int = 64) -> Dict[str, Dataset]:
    """{"train", "val", "test"} datasets; kind "image" (3×size×size) or "sequence" (8×8)."""
    if kind not in ("image", "sequence"):
        raise ValueError(f"kind must be 'image' or 'sequence', got {kind!r}")
    x, y = load_digits_tensors()
    out = {}
    for name, idx in split_indices(len(y), seed).items():
        out[name] = DigitsImages(x[idx], y[idx], size) if kind == "image" else DigitsSequences(x[idx], y[idx])
    return out
