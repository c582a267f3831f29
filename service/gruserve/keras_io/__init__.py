"""Read Keras model files without TensorFlow or Keras.

``load_keras_model(path)`` accepts a ``.keras`` archive (Keras 3, or tf-keras
>= 2.13), a Keras 3 legacy ``.h5`` and a tf-keras / Keras 2 ``.h5``, holding a
Sequential model or a functional model that is a single chain of supported
layers (InputLayer, GRU, RNN over GRUCells, Bidirectional, Dense, Dropout,
Masking, Embedding). It returns a :class:`KerasModel`: the validated
:class:`~gruserve.layers.model.ModelSpec` plus float32 weights keyed exactly
like ``spec.weight_shapes()``. Only ``h5py``, ``zipfile`` and ``json`` are
used, so conversion works on machines without TensorFlow.

Modules: ``archive`` (the zip), ``h5`` (legacy HDF5), ``version`` (Keras 2 or
3), ``topology``/``functional``/``serialized`` (config to layer chain),
``weights`` (stored variables to weight paths), ``loader`` (the entry point).
"""

from gruserve.keras_io.loader import KerasModel, load_keras_model

__all__ = ["KerasModel", "load_keras_model"]
