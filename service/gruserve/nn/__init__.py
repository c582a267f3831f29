"""Torch layers with Keras semantics, constructed from Keras's own arguments.

>>> from gruserve.nn import GRU
>>> layer = GRU(16, return_sequences=True, reset_after=False, input_dim=8)
>>> layer.keras_weights()["kernel"].shape
torch.Size([8, 48])
"""

from gruserve.nn.core import Dense, Dropout, Embedding, InputLayer, Masking
from gruserve.nn.recurrent import GRU, RNN, Bidirectional, GRUCell, StackedRNNCells
from gruserve.nn.sequential import Sequential, layer_from_spec

__all__ = [
    "GRU",
    "RNN",
    "Bidirectional",
    "Dense",
    "Dropout",
    "Embedding",
    "GRUCell",
    "InputLayer",
    "Masking",
    "Sequential",
    "StackedRNNCells",
    "layer_from_spec",
]
