"""Keras 3 models saved by the real ``keras`` package, read back without it.

Every model gets random weights (biases too), is saved as ``.keras`` and as a
legacy ``.h5``, and imported with :func:`load_keras_model`. The imported weights
must equal the Keras variables exactly, located by attribute (``cell.kernel``,
``forward_layer.cell.cells[1].bias``...) rather than by any order, and the
numpy reference forward pass must reproduce Keras's own output.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
layers = keras.layers

from gruserve.keras_io import load_keras_model  # noqa: E402
from gruserve.layers.backend import NUMPY  # noqa: E402
from gruserve.layers.forward import run_model  # noqa: E402

T, F = 6, 3


def _features(rng: np.random.Generator, batch: int = 3) -> np.ndarray:
    return rng.normal(size=(batch, T, F)).astype(np.float32)


def sequential_gru(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    model = keras.Sequential([keras.Input((T, F)), layers.GRU(4)])
    return model, _features(rng)


def functional_gru(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """Keras 3's own hard_sigmoid and reset_after=False, to prove version detection says 3."""
    inputs = keras.Input((T, F), name="frames")
    hidden = layers.GRU(5, recurrent_activation="hard_sigmoid", reset_after=False, name="enc")(
        inputs
    )
    outputs = layers.Dense(2, activation="tanh", name="head")(hidden)
    return keras.Model(inputs, outputs, name="fn"), _features(rng) * 2.0


def stacked_grus(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            layers.GRU(4, return_sequences=True),
            layers.GRU(3, return_sequences=True, use_bias=False),
            layers.GRU(2, return_sequences=True, go_backwards=True),
        ]
    )
    return model, _features(rng)


def rnn_gru_cells(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            layers.RNN(layers.GRUCell(3), return_sequences=True),
            layers.RNN([layers.GRUCell(4), layers.GRUCell(2, reset_after=False)]),
        ]
    )
    return model, _features(rng)


def bidirectional_concat(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            layers.Bidirectional(layers.GRU(3, return_sequences=True)),
            layers.Dense(2),
        ]
    )
    return model, _features(rng)


def bidirectional_sum(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            layers.Bidirectional(layers.GRU(3), merge_mode="sum"),
        ]
    )
    return model, _features(rng)


def bidirectional_stacked_cells(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    cells = [layers.GRUCell(4), layers.GRUCell(2)]
    model = keras.Sequential([keras.Input((T, F)), layers.Bidirectional(layers.RNN(cells))])
    return model, _features(rng)


def _ids(rng: np.random.Generator) -> np.ndarray:
    ids = rng.integers(1, 9, size=(3, T)).astype(np.int32)
    ids[1, 4:] = 0
    ids[2, :2] = 0
    return ids


def embedding_gru_dense(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            layers.Embedding(9, 3, mask_zero=True),
            layers.GRU(4),
            layers.Dense(2),
        ]
    )
    return model, _ids(rng)


def functional_embedding_bidirectional(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """Keras 3 records the Embedding mask as a NotEqual op passed as `mask=`."""
    inputs = keras.Input((T,), dtype="int32")
    hidden = layers.Embedding(9, 3, mask_zero=True)(inputs)
    hidden = layers.GRU(4, return_sequences=True)(hidden)
    hidden = layers.Bidirectional(layers.GRU(3, return_sequences=True))(hidden)
    return keras.Model(inputs, layers.Dense(2)(hidden)), _ids(rng)


def _padded(rng: np.random.Generator, value: float) -> np.ndarray:
    x = _features(rng)
    x[0, 4:] = value
    x[1, 2] = value
    x[2, :1] = value
    return x


def masking_gru(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    model = keras.Sequential(
        [keras.Input((T, F)), layers.Masking(), layers.GRU(4, return_sequences=True)]
    )
    return model, _padded(rng, 0.0)


def functional_masking_gru(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """Keras 3 records Masking's mask as NotEqual -> Any ops; mask_value must match."""
    inputs = keras.Input((T, F))
    hidden = layers.Masking(mask_value=-1.0)(inputs)
    hidden = layers.GRU(4, return_sequences=True)(hidden)
    return keras.Model(inputs, layers.GRU(2)(hidden)), _padded(rng, -1.0)


def dropout_between(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    # Names out of class order: the archive still counts groups dense, dense_1 by position.
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            layers.GRU(4, return_sequences=True, name="zz_gru"),
            layers.Dropout(0.5),
            layers.Dense(3, activation="relu", name="zz_dense"),
            layers.Dropout(0.3),
            layers.GRU(3, name="aa_gru"),
            layers.Dense(2, name="aa_dense"),
        ]
    )
    return model, _features(rng)


BUILDERS: dict[str, Callable[[np.random.Generator], tuple[Any, np.ndarray]]] = {
    fn.__name__: fn
    for fn in (
        sequential_gru,
        functional_gru,
        stacked_grus,
        rnn_gru_cells,
        bidirectional_concat,
        bidirectional_sum,
        bidirectional_stacked_cells,
        embedding_gru_dense,
        functional_embedding_bidirectional,
        masking_gru,
        functional_masking_gru,
        dropout_between,
    )
}


def randomize(model: Any, rng: np.random.Generator) -> None:
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.uniform(-0.7, 0.7, w.shape).astype(np.float32) for w in weights])


def _cell_weights(cell: Any, prefix: str) -> dict[str, Any]:
    found = {f"{prefix}kernel": cell.kernel, f"{prefix}recurrent_kernel": cell.recurrent_kernel}
    if cell.use_bias:
        found[f"{prefix}bias"] = cell.bias
    return found


def _rnn_weights(layer: Any, prefix: str = "") -> dict[str, Any]:
    cells = getattr(layer.cell, "cells", None)
    if cells is None:
        return _cell_weights(layer.cell, prefix)
    found: dict[str, Any] = {}
    for i, cell in enumerate(cells):
        found.update(_cell_weights(cell, f"{prefix}cells/{i}/"))
    return found


def keras_weights(layer: Any) -> dict[str, np.ndarray]:
    """A Keras layer's variables by our weight paths, found by attribute, not by order."""
    if isinstance(layer, layers.Bidirectional):
        found = {
            **_rnn_weights(layer.forward_layer, "forward/"),
            **_rnn_weights(layer.backward_layer, "backward/"),
        }
    elif isinstance(layer, layers.RNN):
        found = _rnn_weights(layer)
    elif isinstance(layer, layers.Dense):
        found = {"kernel": layer.kernel, "bias": layer.bias}
    elif isinstance(layer, layers.Embedding):
        found = {"embeddings": layer.embeddings}
    else:
        found = {}
    return {path: keras.ops.convert_to_numpy(variable) for path, variable in found.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, np.ndarray, Path]]:
    """Each model built, randomized and saved once in each format (zipped=False: a folder)."""
    folder = tmp_path_factory.mktemp("keras3")
    result = {}
    for index, (name, build) in enumerate(BUILDERS.items()):
        rng = np.random.default_rng(1000 + index)
        model, x = build(rng)
        randomize(model, rng)
        model.save(folder / f"{name}.keras")
        model.save(folder / f"{name}.h5")
        model.save(folder / f"{name}.dir", zipped=False)
        result[name] = (model, x, folder)
    return result


FORMATS = {".keras": "keras", ".h5": "keras_h5", ".dir": "keras_dir"}


@pytest.mark.parametrize("suffix", list(FORMATS))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_keras3_round_trip(
    saved: dict[str, tuple[Any, np.ndarray, Path]], name: str, suffix: str
) -> None:
    model, x, folder = saved[name]
    imported = load_keras_model(folder / f"{name}{suffix}")

    assert imported.spec.keras_version == 3
    assert imported.source["format"] == FORMATS[suffix]
    assert imported.source["keras_version"] == keras.__version__
    assert [layer.name for layer in imported.spec.layers] == [
        layer.name for layer in model.layers if not isinstance(layer, layers.InputLayer)
    ]

    # (a) every variable, exactly, at the right path; nothing extra.
    for layer in model.layers:
        expected = keras_weights(layer)
        got = imported.weights.get(layer.name, {})
        assert set(got) == set(expected), layer.name
        for path, value in expected.items():
            assert got[path].dtype == np.float32
            np.testing.assert_array_equal(got[path], value, err_msg=f"{layer.name}/{path}")
        assert len(layer.get_weights()) == len(got)
    assert set(imported.weights) == set(imported.spec.weight_shapes())

    # (b) the numpy reference pass reproduces Keras.
    want = keras.ops.convert_to_numpy(model(x, training=False))
    outputs, _ = run_model(NUMPY, imported.spec, imported.weights, x)
    assert outputs[0].shape == want.shape
    np.testing.assert_allclose(outputs[0], want, rtol=0, atol=1e-5)


def test_keras3_hard_sigmoid_is_not_keras2(saved: dict[str, tuple[Any, np.ndarray, Path]]) -> None:
    model, _, folder = saved["functional_gru"]
    spec = load_keras_model(folder / "functional_gru.keras").spec
    cell = spec.layers[0].cell  # type: ignore[attr-defined]
    assert (cell.recurrent_activation, cell.keras_version) == ("hard_sigmoid", 3)
    assert model.get_layer("enc").cell.reset_after is False


def test_sequential_built_without_input(tmp_path: Path) -> None:
    """Keras 3 Sequential built via model.build(shape): the input comes from the file."""
    model = keras.Sequential([layers.GRU(3), layers.Dense(1)])
    model.build((None, T, F))
    randomize(model, np.random.default_rng(7))
    model.save(tmp_path / "built.keras")
    imported = load_keras_model(tmp_path / "built.keras")
    assert imported.spec.input_features == F
    x = _features(np.random.default_rng(8))
    outputs, _ = run_model(NUMPY, imported.spec, imported.weights, x)
    want = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(outputs[0], want, rtol=0, atol=1e-5)
