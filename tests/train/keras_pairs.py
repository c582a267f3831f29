"""A real Keras model and its gruserve twin with the same weights, for training tests.

The twin is built from Keras's own ``get_config()``; Keras's ``get_weights()``
order is the order of ``spec.weight_shapes()``, which maps them by name.
"""

from __future__ import annotations

import numpy as np

from gruserve.nn.base import KerasLayer
from gruserve.nn.sequential import Sequential
from keras_helpers import keras


def twin(model: keras.Model) -> Sequential:
    """A gruserve Sequential with the config and current weights of a keras Sequential."""
    ours = Sequential.from_config(model.get_config())
    spec = ours.to_spec()
    shapes = spec.weight_shapes()
    weights = {}
    for layer, ours_spec in zip(model.layers, spec.layers, strict=True):
        paths = shapes.get(ours_spec.name, {})
        values = layer.get_weights()
        assert len(values) == len(paths), (ours_spec.name, list(paths))
        if paths:
            weights[ours_spec.name] = dict(zip(paths, values, strict=True))
    ours.set_weights(weights)
    return ours


def weight_diff(model: keras.Model, ours: Sequential) -> float:
    """max |keras weight - gruserve weight| over every weight of the model."""
    mine = ours.get_weights()
    worst = 0.0
    for layer, ours_layer in zip(model.layers, ours.layers, strict=True):
        assert isinstance(ours_layer, KerasLayer)
        values = layer.get_weights()
        if not values:
            continue
        for theirs, (_, value) in zip(values, mine[ours_layer.name].items(), strict=True):
            assert theirs.shape == value.shape
            worst = max(worst, float(np.max(np.abs(theirs - value))))
    return worst
