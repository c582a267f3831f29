"""Whole models vs the real keras: layers around the GRU, stacks, stateful calls.

Each model is a real ``keras.Sequential``; gruserve rebuilds it from
``get_config()`` and ``get_weights()``, and both the torch model and the
exported ONNX graph must reproduce Keras's predictions (max |diff| <= 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gruserve.layers.model import ModelSpec
from gruserve.nn.recurrent import GRU
from gruserve.nn.sequential import Sequential
from keras_helpers import assert_close, keras, onnx_session, randomize, run_onnx, to_numpy

B, T, F = 4, 7, 3


def _model_pair(keras_model: keras.Model) -> tuple[ModelSpec, dict, Sequential, object]:  # type: ignore[type-arg]
    spec = ModelSpec.from_layer_configs("m", keras_model.get_config()["layers"])
    weights = {}
    for layer, ours in zip(keras_model.layers, spec.layers, strict=True):
        shapes = spec.weight_shapes().get(ours.name, {})
        weights[ours.name] = dict(zip(shapes, layer.get_weights(), strict=True))
    weights = {k: v for k, v in weights.items() if v}
    return spec, weights, Sequential.from_spec(spec, weights).eval(), onnx_session(spec, weights)


def _check(keras_model: keras.Model, x: np.ndarray) -> None:
    expected = [to_numpy(keras_model(x))]
    spec, _, torch_model, session = _model_pair(keras_model)
    with torch.no_grad():
        ours = torch_model(torch.from_numpy(x))
    assert_close([to_numpy(ours)], expected)
    outputs, _ = run_onnx(session, spec, x, None)  # type: ignore[arg-type]
    assert_close(outputs, expected)


def _float_inputs(rng: np.random.Generator, zero_steps: bool = False) -> np.ndarray:
    x = rng.normal(size=(B, T, F)).astype(np.float32)
    if zero_steps:  # Masking(0.0) will mask these: a hole, and right padding
        x[0, 2] = 0.0
        x[1, 4:] = 0.0
        x[2, :3] = 0.0
    return x


MODELS = {
    "dense_head": lambda: [keras.layers.GRU(6), keras.layers.Dense(2)],
    "dense_per_timestep": lambda: [
        keras.layers.GRU(6, return_sequences=True),
        keras.layers.Dense(3, activation="tanh"),
    ],
    "stacked_layers": lambda: [
        keras.layers.GRU(5, return_sequences=True),
        keras.layers.GRU(4, reset_after=False, activation="relu6"),
        keras.layers.Dense(1),
    ],
    "stacked_cells": lambda: [
        keras.layers.RNN([keras.layers.GRUCell(5), keras.layers.GRUCell(4)], return_sequences=True),
        keras.layers.Dense(2),
    ],
    "dropout_between": lambda: [
        keras.layers.GRU(5, return_sequences=True, dropout=0.3),
        keras.layers.Dropout(0.5),
        keras.layers.GRU(3),
    ],
    "bidirectional_then_gru": lambda: [
        keras.layers.Bidirectional(keras.layers.GRU(4, return_sequences=True)),
        keras.layers.GRU(3, go_backwards=True),
    ],
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("masking", [False, True])
def test_sequential_models(name: str, masking: bool, rng: np.random.Generator) -> None:
    layers = ([keras.layers.Masking(0.0)] if masking else []) + MODELS[name]()
    model = keras.Sequential([keras.Input((T, F)), *layers])
    randomize(model, rng)
    _check(model, _float_inputs(rng, zero_steps=masking))


@pytest.mark.parametrize("return_sequences", [False, True])
def test_embedding_mask_zero(return_sequences: bool, rng: np.random.Generator) -> None:
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(10, 4, mask_zero=True),
            keras.layers.GRU(5, return_sequences=return_sequences),
            keras.layers.Dense(2),
        ]
    )
    randomize(model, rng)
    ids = rng.integers(1, 10, size=(B, T)).astype(np.int32)
    ids[0, 3] = 0  # a hole
    ids[1, 5:] = 0  # right padding
    ids[2, :2] = 0  # left padding
    expected = [to_numpy(model(ids))]
    spec, _, torch_model, session = _model_pair(model)
    assert_close([to_numpy(torch_model(torch.from_numpy(ids.astype(np.int64))))], expected)
    outputs, _ = run_onnx(session, spec, ids.astype(np.int64), None)  # type: ignore[arg-type]
    assert_close(outputs, expected)


def test_masking_actually_changes_keras_results(rng: np.random.Generator) -> None:
    """Guards the grid: with these inputs Keras's masking is not a no-op."""
    layer = keras.layers.GRU(4, return_sequences=True)
    x = _float_inputs(rng, zero_steps=True)
    masked = keras.Sequential([keras.Input((T, F)), keras.layers.Masking(0.0), layer])
    plain = keras.Sequential([keras.Input((T, F)), layer])
    assert np.abs(to_numpy(masked(x)) - to_numpy(plain(x))).max() > 1e-2


def test_stateful_consecutive_calls_and_reset(rng: np.random.Generator) -> None:
    """Keras stateful=True == our stateful torch layer == chaining the graph's states."""
    model = keras.Sequential(
        [
            keras.Input(batch_shape=(B, T, F)),
            keras.layers.GRU(5, stateful=True, return_sequences=True),
            keras.layers.Dense(2),
        ]
    )
    randomize(model, rng)
    chunks = [_float_inputs(rng) for _ in range(3)]
    expected = [to_numpy(model(chunks[0])), to_numpy(model(chunks[1]))]
    model.layers[0].reset_state()
    expected.append(to_numpy(model(chunks[2])))

    spec, _, torch_model, session = _model_pair(model)
    with torch.no_grad():
        ours = [torch_model(torch.from_numpy(chunks[0])), torch_model(torch.from_numpy(chunks[1]))]
        torch_model.reset_states()
        ours.append(torch_model(torch.from_numpy(chunks[2])))
    assert_close([to_numpy(o) for o in ours], expected)
    # Different results after the reset prove the state was carried before it.
    assert np.abs(expected[1] - to_numpy(model(chunks[1]))).max() > 1e-3

    state: dict[str, list[np.ndarray]] | None = None
    graph = []
    for i, chunk in enumerate(chunks):
        if i == 2:
            state = None  # reset
        outputs, final = run_onnx(session, spec, chunk, None, state)  # type: ignore[arg-type]
        graph.append(outputs[0])
        state = {spec.layers[0].name: final}
    assert_close(graph, expected)


def test_reset_states_with_values_matches_initial_state(rng: np.random.Generator) -> None:
    """tf-keras's reset_states(states=h) == Keras's call with initial_state=h."""
    keras_layer = keras.layers.GRU(5, return_sequences=True)
    x = _float_inputs(rng)
    keras_layer(x)
    randomize(keras_layer, rng)
    h = rng.normal(size=(B, 5)).astype(np.float32)
    expected = to_numpy(keras_layer(x, initial_state=h))

    ours = GRU(**{**keras_layer.get_config(), "stateful": True}, input_dim=F)
    ours.set_keras_weights(
        dict(zip(["kernel", "recurrent_kernel", "bias"], keras_layer.get_weights(), strict=True))
    )
    with torch.no_grad():
        ours(torch.from_numpy(x))
        ours.reset_states(states=[h])
        got = ours(torch.from_numpy(x))
    assert_close([to_numpy(got)], [expected])
    with pytest.raises(ValueError, match="shape"):
        ours.reset_states(states=[np.zeros((B + 1, 5), np.float32)])
    with pytest.raises(ValueError, match="stateful=True"):
        GRU(5, input_dim=F).reset_states()
