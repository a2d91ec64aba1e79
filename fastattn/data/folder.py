"""User images: a folder with one subfolder per class (``root/<class>/<image>``), read with PIL."""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch.utils.data import Dataset

from fastattn.data.digits import split_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise RuntimeError("reading an image folder needs Pillow (pip install pillow)") from e
    return Image


class ImageFolder(Dataset):
    """All images under ``root``, resized to ``size``×``size`` RGB, values in [0, 1], labels by class folder."""

    def __init__(self, root: str, size: int = 64):
        Image = _pil()
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if len(self.classes) < 2:
            raise ValueError(f"image folder {root!r} needs >= 2 class subfolders, found {self.classes}")
        self.files, labels = [], []
        for ci, c in enumerate(self.classes):
            for f in sorted(os.listdir(os.path.join(root, c))):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append(os.path.join(root, c, f))
                    labels.append(ci)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.size, self.num_classes, self._Image = size, len(self.classes), Image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        with self._Image.open(self.files[i]) as im:
            im = im.convert("RGB").resize((self.size, self.size))
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = x.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        return x, self.labels[i]


def image_folder(root: str, seed: int = 0, size: int = 64) -> Dict[str, Dataset]:
    """{"train", "val", "test"} subsets (70/15/15 %, seeded) of an ``ImageFolder``."""
    full = ImageFolder(root, size)
    out = {}
    for name, idx in split_indices(len(full), seed).items():
        sub = torch.utils.data.Subset(full, idx.tolist())
        sub.num_classes = full.num_classes
        out[name] = sub
    return out
