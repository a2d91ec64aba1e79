"""Drop-in modules: torch's constructor signatures, parameter names and ``state_dict`` keys, our kernels."""
from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.conv import Conv2d, Conv2dReLUMaxPool2d
from fastattn.nn.linear import Linear
from fastattn.nn.rnn import LSTM, LSTMCell
from fastattn.nn.transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                                     TransformerEncoderLayer)

__all__ = ["MultiheadAttention", "Transformer", "TransformerEncoder", "TransformerDecoder",
           "TransformerEncoderLayer", "TransformerDecoderLayer", "Conv2d", "Conv2dReLUMaxPool2d", "Linear", "LSTM",
           "LSTMCell"]
