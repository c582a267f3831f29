"""Keras layer semantics shared by the torch modules, the importer and the exporter.

Specs (validated Keras configs) live in ``base``/``core``/``recurrent``/``model``;
the math, written once against an array backend, in ``forward`` and
``activations``; weight options in ``initializers``, ``regularizers`` and
``constraints``.
"""

from gruserve.layers.core import DenseSpec, DropoutSpec, EmbeddingSpec, InputLayerSpec, MaskingSpec
from gruserve.layers.model import ModelSpec, StateSpec, layer_from_config, supported_layers
from gruserve.layers.recurrent import BidirectionalSpec, GRUCellSpec, GRUSpec, RNNSpec

__all__ = [
    "BidirectionalSpec",
    "DenseSpec",
    "DropoutSpec",
    "EmbeddingSpec",
    "GRUCellSpec",
    "GRUSpec",
    "InputLayerSpec",
    "MaskingSpec",
    "ModelSpec",
    "RNNSpec",
    "StateSpec",
    "layer_from_config",
    "supported_layers",
]
