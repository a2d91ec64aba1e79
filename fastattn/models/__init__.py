"""Models built from fastattn's modules (``impl="fastattn"``) or torch's (``impl="torch"``), same weights."""
from fastattn.models._impl import IMPLS, modules
from fastattn.models.convnet import ConvNet
from fastattn.models.rnn import LSTMClassifier
from fastattn.models.transformer import Seq2SeqTransformer, TransformerLM

__all__ = ["IMPLS", "modules", "ConvNet", "LSTMClassifier", "Seq2SeqTransformer", "TransformerLM"]
