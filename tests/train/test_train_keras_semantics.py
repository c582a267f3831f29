"""Initializers and dropout as Keras trains with them.

- glorot_uniform draws the whole (F, 3U) kernel with limit sqrt(6 / (F + 3U));
  orthogonal makes the rows of the whole (U, 3U) recurrent kernel
  orthonormal (not each gate block); the statistics match Keras's own.
- dropout / recurrent_dropout masks are drawn once per call and shared by all
  timesteps, one per gate for implementation=1, values 0 or 1/(1-rate) in the
  configured proportion; with the same masks the training-mode outputs and
  gradients equal Keras's; inference ignores them; a seed reproduces them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from keras_pairs import twin

from gruserve.layers.forward import CellDropout
from gruserve.nn.recurrent import GRU, GRUCell
from gruserve.nn.sequential import Sequential
from keras_helpers import keras, to_numpy

F, U = 24, 40


def _keras_gru_weights(seed: int) -> list[np.ndarray]:
    keras.utils.set_random_seed(seed)
    layer = keras.layers.GRU(U)
    layer.build((None, None, F))
    return layer.get_weights()


def _our_gru_weights(seed: int) -> dict[str, np.ndarray]:
    layer = GRU(U, input_dim=F)
    layer.initialize_weights(np.random.default_rng(seed))
    return layer.get_weights()


def test_glorot_uniform_spans_the_whole_kernel_like_keras() -> None:
    limit = math.sqrt(6.0 / (F + 3 * U))
    ours = _our_gru_weights(0)["kernel"]
    theirs = _keras_gru_weights(0)[0]
    for kernel in (ours, theirs):
        assert kernel.shape == (F, 3 * U)
        assert np.abs(kernel).max() <= limit
        assert np.abs(kernel).max() > 0.97 * limit  # the bound is the whole matrix's, not a gate's
        assert kernel.std() == pytest.approx(limit / math.sqrt(3.0), rel=0.05)
    assert ours.std() == pytest.approx(theirs.std(), rel=0.06)
    assert ours.mean() == pytest.approx(theirs.mean(), abs=0.01)


def test_orthogonal_rows_of_the_whole_recurrent_kernel_like_keras() -> None:
    ours = _our_gru_weights(1)["recurrent_kernel"]
    theirs = _keras_gru_weights(1)[1]
    for recurrent in (ours, theirs):
        assert recurrent.shape == (U, 3 * U)
        np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(U), atol=1e-5)
        block = recurrent[:, :U]  # one gate's block alone is not orthogonal
        assert np.abs(block @ block.T - np.eye(U)).max() > 0.1
    assert np.abs(ours).std() == pytest.approx(np.abs(theirs).std(), rel=0.05)


def test_bias_starts_at_zero_and_a_seed_reproduces_the_draw() -> None:
    first, second = _our_gru_weights(5), _our_gru_weights(5)
    assert not first["bias"].any()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert not np.array_equal(first["kernel"], _our_gru_weights(6)["kernel"])
    seeded = GRU(
        U, input_dim=F, kernel_initializer={"class_name": "GlorotUniform", "config": {"seed": 3}}
    )
    again = seeded.get_weights()["kernel"]
    seeded.initialize_weights(np.random.default_rng(99))  # an initializer seed wins, as in Keras
    np.testing.assert_array_equal(seeded.get_weights()["kernel"], again)


@pytest.mark.parametrize(
    ("implementation", "recurrent_dropout", "input_masks"),
    [(2, 0.0, 1), (1, 0.0, 3), (2, 0.25, 3)],  # recurrent dropout forces implementation 1
)
def test_masks_are_drawn_once_per_call_with_the_configured_rate(
    implementation: int, recurrent_dropout: float, input_masks: int
) -> None:
    rate, batch, steps = 0.3, 4000, 5
    layer = GRU(
        8,
        dropout=rate,
        recurrent_dropout=recurrent_dropout,
        implementation=implementation,
        seed=11,
        input_dim=F,
        return_sequences=True,
    )
    drawn: list[CellDropout] = []
    original = layer.cell.dropout_masks

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        masks = original(*args, **kwargs)
        drawn.append(masks)
        return masks

    layer.cell.dropout_masks = spy  # type: ignore[method-assign]
    layer(torch.ones(batch, steps, F), training=True)
    assert len(drawn) == 1  # one draw for the whole call, reused at every timestep
    masks = drawn[0]
    assert masks.inputs is not None
    assert len(masks.inputs) == input_masks
    for mask in masks.inputs:
        assert tuple(mask.shape) == (batch, F)  # no time axis: shared by all timesteps
        np.testing.assert_allclose(np.unique(to_numpy(mask)), [0.0, 1 / (1 - rate)], rtol=1e-6)
        assert float((mask == 0).float().mean()) == pytest.approx(rate, abs=0.01)
    if recurrent_dropout:
        assert masks.recurrent is not None
        assert len(masks.recurrent) == 3
        for mask in masks.recurrent:
            assert tuple(mask.shape) == (batch, 8)
            assert float((mask == 0).float().mean()) == pytest.approx(recurrent_dropout, abs=0.01)
    else:
        assert masks.recurrent is None
    assert layer.cell._masks is None  # forgotten after the call: the next call draws anew


@pytest.mark.parametrize("recurrent_dropout", [0.0, 0.4])
@pytest.mark.parametrize("implementation", [1, 2])
def test_training_call_with_the_same_masks_equals_keras(
    implementation: int, recurrent_dropout: float
) -> None:
    """Masks injected into both: outputs and gradients match, so they are used like Keras."""
    batch, steps = 3, 7
    keras.utils.set_random_seed(12)
    model = keras.Sequential(
        [
            keras.Input((steps, F)),
            # use_cudnn=False: Keras 3.15's "auto" path fails on implementation=1 with dropout
            # (it broadcasts the list of three masks); the cell path is the reference semantics.
            keras.layers.GRU(
                6,
                dropout=0.5,
                recurrent_dropout=recurrent_dropout,
                implementation=implementation,
                return_sequences=True,
                use_cudnn=False,
            ),
        ]
    )
    ours = twin(model)
    rng = np.random.default_rng(0)
    count = 3 if implementation == 1 or recurrent_dropout else 1
    inputs = [(rng.random((batch, F)) > 0.5).astype(np.float32) * 2 for _ in range(count)]
    recurrent = [(rng.random((batch, 6)) > 0.4).astype(np.float32) / 0.6 for _ in range(3)]
    keras_cell = model.layers[0].cell
    queue = [inputs if count == 3 else inputs[0], recurrent]
    keras_cell._create_dropout_mask = lambda step_input, rate: (  # type: ignore[method-assign]
        [keras.ops.convert_to_tensor(m) for m in queue.pop(0)]
        if isinstance(queue[0], list)
        else keras.ops.convert_to_tensor(queue.pop(0))
    )
    gru = ours.layers[0]
    assert isinstance(gru, GRU) and isinstance(gru.cell, GRUCell)
    gru.cell._masks = CellDropout(
        [torch.from_numpy(m) for m in inputs],
        [torch.from_numpy(m) for m in recurrent] if recurrent_dropout else None,
    )
    x = rng.normal(size=(batch, steps, F)).astype(np.float32)
    expected = model(x, training=True)
    keras_loss = keras.ops.sum(keras.ops.square(expected))
    keras_loss.backward()
    keras_grads = [to_numpy(v.value.grad) for v in model.trainable_weights]
    output = ours(torch.from_numpy(x), training=True)
    torch.sum(output * output).backward()
    np.testing.assert_allclose(to_numpy(output), to_numpy(expected), atol=1e-5)
    for theirs, param in zip(keras_grads, gru.keras_weights().values(), strict=True):
        np.testing.assert_allclose(to_numpy(param.grad), theirs, atol=1e-4)


def test_inference_ignores_dropout_and_seeds_reproduce_training_masks() -> None:
    keras.utils.set_random_seed(13)
    config = {"units": 6, "dropout": 0.5, "recurrent_dropout": 0.5, "return_sequences": True}
    plain = keras.Sequential([keras.Input((5, F)), keras.layers.GRU(**config)])
    ours = twin(plain)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 5, F)).astype(np.float32))
    ours.eval()
    first, second = ours(x), ours(x)
    np.testing.assert_array_equal(to_numpy(first), to_numpy(second))
    np.testing.assert_allclose(
        to_numpy(first), to_numpy(plain(x.numpy(), training=False)), atol=1e-5
    )
    runs = []
    for _ in range(2):
        torch.manual_seed(21)  # training.seed seeds torch: unseeded layers draw reproducibly
        model = Sequential.from_config(plain.get_config())
        model.set_weights(ours.get_weights())
        runs.append(to_numpy(model(x, training=True)))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - to_numpy(first)).max() > 1e-3  # and they do drop something
    seeded = [GRU(6, dropout=0.5, seed=4, input_dim=F, return_sequences=True) for _ in range(2)]
    seeded[1].set_keras_weights(seeded[0].get_weights())
    first_seeded, second_seeded = (to_numpy(s(x, training=True)) for s in seeded)
    np.testing.assert_array_equal(first_seeded, second_seeded)
