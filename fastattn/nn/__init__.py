"""Drop-in modules: torch's constructor signatures, parameter names and ``state_dict`` keys, our kernels."""
from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                                     TransformerEncoderLayer)

__all__ = ["MultiheadAttention", "Transformer", "TransformerEncoder", "TransformerDecoder",
           "TransformerEncoderLayer", "TransformerDecoderLayer"]

# Colleagues' modules, exported once their branches are merged (the lead tidies this at merge).
try:
    from fastattn.nn.conv import Conv2d  # noqa: F401
    __all__.append("Conv2d")
except ImportError:
    pass
try:
    from fastattn.nn.rnn import LSTM, LSTMCell  # noqa: F401
    __all__ += ["LSTM", "LSTMCell"]
except ImportError:
    pass
