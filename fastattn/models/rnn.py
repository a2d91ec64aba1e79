"""The seed RNN: an LSTM (hidden 50) over the sequence, its last hidden state → Linear → classes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastattn.models._impl import modules


class LSTMClassifier(nn.Module):
    def __init__(self, input_size: int = 8, num_classes: int = 10, hidden_size: int = 50, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0, impl: str = "fastattn",
                 backend: Optional[str] = None):
        super().__init__()
        M = modules(impl, backend)
        self.dirs = 2 if bidirectional else 1
        self.lstm = M.LSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout,
                           bidirectional=bidirectional)
        self.fc = M.Linear(hidden_size * self.dirs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, steps, input_size) → logits (batch, classes)."""
        _, (h_n, _) = self.lstm(x)
        last = h_n[-self.dirs:].transpose(0, 1).reshape(x.shape[0], -1)  # the top layer's final state(s)
        return self.fc(last)
