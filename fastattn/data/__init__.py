"""Offline data sets (nothing here downloads): digits, a character corpus, synthetic seq2seq tasks, user folders."""
from fastattn.data.digits import DigitsImages, DigitsSequences, digits, split_indices
from fastattn.data.folder import ImageFolder, image_folder
from fastattn.data.seq2seq import TASKS as SEQ2SEQ_TASKS, seq2seq
from fastattn.data.text import CharVocab, char_lm, load_text_file, pydoc_corpus

__all__ = ["digits", "DigitsImages", "DigitsSequences", "split_indices", "ImageFolder", "image_folder",
           "seq2seq", "SEQ2SEQ_TASKS", "char_lm", "CharVocab", "load_text_file", "pydoc_corpus"]
